"""fusion/loading.py's layer groups: a small first group (CacheBlend's check of layers 0-1 waits
for little of the transfer), then groups ending at multiples of the group size."""
from kvcompile.fusion.loading import layer_groups


def test_layer_groups_cover_every_layer_once_in_order():
    for layers in range(1, 40):
        for group in (1, 2, 3, 8):
            ranges = layer_groups(layers, group)
            assert [i for r in ranges for i in r] == list(range(layers))
            assert all(len(r) <= max(group, 2) for r in ranges)


def test_layer_groups_of_the_8b_benchmark():
    assert [(r.start, r.stop) for r in layer_groups(32, 8)] == [(0, 2), (2, 8), (8, 16), (16, 24), (24, 32)]
