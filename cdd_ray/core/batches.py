"""The random streams of one rank: batches drawn uniformly with replacement (or class-balanced) from
device-resident datasets, one generator per dataset, seeded per rank and stream so that runs are reproducible
and resumable bitwise."""

from __future__ import annotations


import torch


NOISE_STREAM, MONITOR_STREAM = 997, 1999  # stream ids of the noise generators (datasets are 0, 1, ...)


def stream_seed(seed: int, rank: int, stream: int, joined_at: int = 0) -> int:
    """The seed of one random stream of one rank. ``joined_at`` > 0: the step at which this rank joined a run
    resumed with more workers than its checkpoint had, so that it never replays a stream any rank drew before
    (not even its own namesake's from before a resume with fewer workers)."""
    return seed * 1_000_003 + rank * 7919 + stream + joined_at * 1_000_000_007


class BatchSampler:
    """Uniform sampling with replacement from device-resident tensors, one generator per dataset.

    ``balanced_labels`` (the first dataset's class labels): that dataset is drawn class-balanced instead:
    each draw picks one of its classes uniformly, then an image of that class uniformly (with replacement),
    from the same generator, so it is reproducible per rank and resumable like the uniform draws.
    """

    def __init__(self, datasets: list[torch.Tensor], sizes: list[int], seed: int, rank: int,
                 balanced_labels: torch.Tensor | None = None, joined_at: int = 0):
        self.datasets, self.sizes = datasets, sizes
        self.generators = [torch.Generator().manual_seed(stream_seed(seed, rank, i, joined_at))
                           for i in range(len(datasets))]
        self.balanced = None
        if balanced_labels is not None:
            y = balanced_labels.cpu()
            if y.shape[0] != datasets[0].shape[0]:
                raise ValueError(f"balanced_labels: {y.shape[0]} labels for {datasets[0].shape[0]} images")
            _, counts = torch.unique(y, sorted=True, return_counts=True)
            # Indices grouped by class; class k's images are order[starts[k] : starts[k] + counts[k]].
            self.balanced = (torch.argsort(y, stable=True), torch.cumsum(counts, 0) - counts, counts)

    def draw(self) -> list[torch.Tensor]:
        out = []
        for i, (data, n, g) in enumerate(zip(self.datasets, self.sizes, self.generators)):
            if i == 0 and self.balanced is not None:
                idx = self._balanced_index(n, g)
            else:
                idx = torch.randint(0, data.shape[0], (n,), generator=g)
            out.append(data[idx.to(data.device, non_blocking=True)])
        return out

    def _balanced_index(self, n: int, g: torch.Generator) -> torch.Tensor:
        order, starts, counts = self.balanced
        k = torch.randint(0, counts.shape[0], (n,), generator=g)
        # Uniform within the class: a 62-bit integer modulo the class size (bias < size / 2^62).
        j = torch.randint(0, 2 ** 62, (n,), generator=g) % counts[k]
        return order[starts[k] + j]

    def state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def load_state(self, states: list[torch.Tensor]) -> None:
        for g, s in zip(self.generators, states):
            g.set_state(s)
