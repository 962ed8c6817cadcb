"""robustagg.layout: flatten / unflatten round trips, mismatch errors, pooling layouts (docs/ops.md)."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

from robustagg.layout import Layout, flatten


def _state_dict(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    model[1].num_batches_tracked += seed
    return model.state_dict()


def test_stacked_tensor_round_trip():
    G = torch.randn(4, 9)
    out, layout = flatten(G)
    assert out is G
    assert torch.equal(layout.unflatten(G[1]), G[1])


def test_list_of_vectors_round_trip():
    rows = [torch.randn(6) for _ in range(3)]
    G, layout = flatten(rows)
    assert G.shape == (3, 6)
    assert torch.equal(G[2], rows[2])
    assert torch.equal(layout.unflatten(G[0]), rows[0])


def test_parameter_lists_round_trip_shapes_and_values():
    clients = [[torch.randn(2, 3), torch.randn(3), torch.randn(())] for _ in range(4)]
    G, layout = flatten(clients)
    assert G.shape == (4, 10)
    back = layout.unflatten(G[3])
    assert [p.shape for p in back] == [torch.Size([2, 3]), torch.Size([3]), torch.Size([])]
    for p, q in zip(back, clients[3]):
        assert torch.equal(p, q)
    assert len(layout.unflatten(G)) == 4


def test_state_dict_round_trip_keeps_keys_shapes_dtypes():
    clients = [_state_dict(s) for s in range(3)]
    G, layout = flatten(clients)
    assert G.dtype == torch.float32
    back = layout.unflatten(G[2])
    assert isinstance(back, OrderedDict)
    assert list(back) == list(clients[2])
    for key, value in clients[2].items():
        assert back[key].shape == value.shape, key
        assert back[key].dtype == value.dtype, key
        assert torch.equal(back[key], value), key


def test_integer_buffers_round_to_nearest_on_unflatten():
    clients = [_state_dict(s) for s in range(3)]
    G, layout = flatten(clients)
    mean = layout.unflatten(G.mean(0))
    assert mean["1.num_batches_tracked"].dtype == torch.int64
    assert int(mean["1.num_batches_tracked"]) == 1  # (0 + 1 + 2) / 3


def test_mixed_float_dtypes_promote():
    clients = [[torch.randn(3, dtype=torch.float16), torch.randn(2, dtype=torch.float64)] for _ in range(2)]
    G, layout = flatten(clients)
    assert G.dtype == torch.float64
    assert layout.unflatten(G[0])[0].dtype == torch.float16


def test_mismatched_state_dict_names_first_differing_key():
    a, b = _state_dict(0), _state_dict(1)
    b["3.weight"] = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"client 1.*'3\.weight'.*\(2, 5\).*\(2, 4\)"):
        flatten([a, b])


def test_missing_state_dict_key_is_named():
    a, b = _state_dict(0), _state_dict(1)
    del b["0.bias"]
    with pytest.raises(ValueError, match=r"client 1.*lacks key '0\.bias'"):
        flatten([a, b])


def test_mismatched_parameter_shapes_are_named():
    with pytest.raises(ValueError, match=r"client 1.*parameter 1.*\(4,\).*\(3,\)"):
        flatten([[torch.zeros(2), torch.zeros(3)], [torch.zeros(2), torch.zeros(4)]])


def test_mismatched_vector_lengths_are_named():
    with pytest.raises(ValueError, match=r"client 2.*length 5.*client 0.*4"):
        flatten([torch.zeros(4), torch.zeros(4), torch.zeros(5)])


def test_empty_and_wrong_inputs_are_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        flatten([])
    with pytest.raises(ValueError, match="2-D"):
        flatten(torch.zeros(3))
    with pytest.raises(TypeError, match="updates\\[0\\]"):
        flatten([3, 4])


def test_from_shapes_matrix_views():
    layout = Layout.from_shapes([(8, 3, 3, 3), (8,), (10, 8), ()])
    segs = layout.segments
    assert [(s.rows, s.cols, s.pooled) for s in segs] == [(8, 27, True), (1, 8, False), (10, 8, True), (1, 1, False)]
    assert [s.offset for s in segs] == [0, 216, 224, 304]
    assert layout.d == 305
    assert layout.pooled_width(305, 2) == 4 * 13 + 8 + 5 * 4 + 1


def test_from_shapes_accepts_modules_and_state_dicts():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    by_module = Layout.from_shapes(model)
    by_dict = Layout.from_shapes(dict(model.named_parameters()))
    assert by_module.d == by_dict.d == sum(p.numel() for p in model.parameters())
    assert [s.name for s in by_module.segments] == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_flat_layout_resolves_against_d():
    layout = Layout.flat(width=10, skip_tail=3)
    (seg,) = layout.segments_for(45)
    assert (seg.offset, seg.rows, seg.cols, seg.pooled) == (0, 4, 10, True)  # 42 values -> 4 full rows
    assert layout.pooled_width(45, 2) == 2 * 5


def test_layout_must_cover_d():
    layout = Layout.from_shapes([(3, 3)])
    with pytest.raises(ValueError, match="covers 9 values but G has d=10"):
        layout.segments_for(10)


@pytest.mark.parametrize("width, skip_tail, match", [(0, 0, "width=0"), (4, -1, "skip_tail=-1")])
def test_flat_layout_rejects_bad_arguments(width, skip_tail, match):
    with pytest.raises(ValueError, match=match):
        Layout.flat(width, skip_tail)


def test_flat_skip_tail_larger_than_d_is_rejected():
    with pytest.raises(ValueError, match="skip_tail=50 exceeds d=45"):
        Layout.flat(10, 50).segments_for(45)


@pytest.mark.parametrize("layout, d", [
    (Layout.from_shapes([(5, 4), (5,), (4, 3)]), 37),
    (Layout.from_shapes([(7, 3, 2), (2,), (9, 5), ()]), 90),
    (Layout.flat(4, skip_tail=13), 37),
    (Layout.flat(6), 50),
])
@pytest.mark.parametrize("kernel", [1, 2, 3])
def test_columns_pool_to_their_part_of_the_pooled_row(layout, d, kernel):
    # cut at every point that keeps the kernel's windows whole; the pieces' pooled rows, in order,
    # are the whole row's pooled row
    from robustagg import ops
    from robustagg.distributed import shard_bounds
    G = torch.randn(3, d, generator=torch.Generator().manual_seed(kernel), dtype=torch.float64)
    whole = ops.maxpool_amplify(G, layout, kernel)
    for world in (2, 3, 5):
        try:
            bounds = shard_bounds(d, world, layout, kernel)
        except ValueError:   # too few cuts for this many ranks
            continue
        pieces = []
        for lo, hi in bounds:
            part = layout.columns(d, lo, hi, kernel)
            if part.pooled_width(hi - lo, kernel):
                pieces.append(ops.maxpool_amplify(G[:, lo:hi], part, kernel))
        assert torch.equal(torch.cat(pieces, dim=1), whole), (world, bounds)


def test_columns_name_a_cut_inside_a_window():
    layout = Layout.from_shapes([(4, 3)])
    assert layout.columns(12, 6, 12, 2).pooled_width(6, 2) == 1
    with pytest.raises(ValueError, match=r"at 3; place the cuts with shard_bounds"):
        layout.columns(12, 3, 12, 2)
