import torch

from lorq.eval.memory import PeakRSS


def test_peak_of_a_phase_counts_what_it_allocates_not_what_came_before():
    before = torch.ones(64 * 2**20 // 4)  # 64 MiB held before the phase: not part of it
    with PeakRSS() as m:
        x = torch.ones(128 * 2**20 // 4)  # 128 MiB, touched
        del x
    assert m.peak_mib >= m.start_mib
    if m.exact:  # Linux: the high-water mark was reset at the start
        assert 100 <= m.phase_mib <= 200
    del before
