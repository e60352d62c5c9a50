"""Pretraining noise paired with its batch one batch ahead: exact OT pairs, keyed draws, resumable, in order."""

import itertools

import pytest
import torch

from prg_hub.noise_pairing import NoisePairing, noise_seed
from prg_hub.paths import get_path


def _batches(count, size=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.rand(size, 2, 3, 3, generator=generator) * 2 - 1, "index": torch.arange(size) + k}
            for k in range(count)]


def _cost(x, noise):
    return ((x - noise) ** 2).sum().item()


def test_each_batch_gets_its_keyed_noise_in_an_exact_optimal_pairing():
    pairing = NoisePairing(get_path("otcfm"), seed=5, process_index=1)
    batches = _batches(4)
    paired = list(pairing.batches(batches, epoch=2))
    assert [batch["index"].tolist() for batch in paired] == [batch["index"].tolist() for batch in batches]
    for position, (batch, original) in enumerate(zip(paired, batches)):
        x = original["pixel_values"]
        assert torch.equal(batch["pixel_values"], x)
        generator = torch.Generator().manual_seed(noise_seed(5, 1, 2, position))
        drawn = torch.randn(x.shape, generator=generator)
        # A permutation of the drawn noise, and the cheapest one (brute force over all 6! pairings).
        order = [next(j for j in range(6) if torch.equal(batch["noise"][i], drawn[j])) for i in range(6)]
        assert sorted(order) == list(range(6))
        best = min(_cost(x, drawn[list(p)]) for p in itertools.permutations(range(6)))
        assert _cost(x, batch["noise"]) == pytest.approx(best, rel=1e-6)
        assert _cost(x, batch["noise"]) < _cost(x, drawn)


def test_independent_paths_keep_the_noise_as_drawn():
    batch = _batches(1)[0]
    noise = next(NoisePairing(get_path("icfm"), seed=0).batches([batch], epoch=0))["noise"]
    generator = torch.Generator().manual_seed(noise_seed(0, 0, 0, 0))
    assert torch.equal(noise, torch.randn(batch["pixel_values"].shape, generator=generator))


def test_noise_differs_by_process_epoch_and_batch_and_a_resumed_epoch_draws_the_same():
    pairing, other_process = NoisePairing(get_path("otcfm"), 0, 0), NoisePairing(get_path("otcfm"), 0, 1)
    batches = _batches(4)
    full = [batch["noise"] for batch in pairing.batches(batches, epoch=0)]
    resumed = [batch["noise"] for batch in pairing.batches(batches[2:], epoch=0, start=2)]
    assert all(torch.equal(a, b) for a, b in zip(full[2:], resumed))
    assert not torch.equal(full[0], full[1])
    assert not torch.equal(full[0], next(pairing.batches(batches, epoch=1))["noise"])
    assert not torch.equal(full[0], next(other_process.batches(batches, epoch=0))["noise"])


class RecordingLoader:
    """A sized iterable of batches that records which batches were taken from it."""

    def __init__(self, batches):
        self.batches, self.taken = batches, []

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.taken.append(int(batch["index"][0]))
            yield batch


def test_the_next_batch_is_paired_while_the_current_one_trains_and_the_last_is_taken_last():
    loader = RecordingLoader(_batches(4))
    handed = []
    for batch in NoisePairing(get_path("otcfm"), 0).batches(loader, epoch=0):
        handed.append(int(batch["index"][0]))
        # One batch ahead, except the last batch, taken only after the one before it was handed over (a prepared
        # data loader flags the end of the epoch as it hands over its last batch).
        assert loader.taken == list(range({1: 2, 2: 3, 3: 3, 4: 4}[len(handed)]))
    assert handed == [0, 1, 2, 3]

    loader = RecordingLoader(_batches(4))
    for batch in NoisePairing(get_path("otcfm"), 0).batches(loader, epoch=0):
        if int(batch["index"][0]) == 1:
            break  # leaving early (the end of a run) stops the worker cleanly
    assert loader.taken == [0, 1, 2]
