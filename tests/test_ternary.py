import pytest
import torch

from timm_qsenn.ternary import pack_ternary, quantize_ternary, ternary_bias, unpack_ternary


def test_global_budget_known_answer():
    weight = torch.tensor([[3.0, -1.0, 0.5], [0.2, -2.0, 0.0], [1.5, 0.0, -0.1]])
    q = quantize_ternary(weight, n_per_class=1)  # budget K = 3
    # Magnitudes 3, 2, 1.5 | 1, ...: tau is the midpoint of the 3rd and 4th, a the mean of the kept ones.
    assert q.threshold == pytest.approx(1.25)
    assert q.scale == pytest.approx((3 + 2 + 1.5) / 3)
    assert q.codes.tolist() == [[1, 0, 0], [0, -1, 0], [1, 0, 0]]
    assert q.codes.dtype == torch.int8
    assert torch.allclose(q.weight, q.codes.float() * q.scale)
    assert q.nnz == 3


def test_largest_negative_weight_keeps_its_sign_and_counts_towards_scale():
    # The reference flips the sign of the largest-magnitude weight when it is negative and drops it from a.
    weight = torch.tensor([[-5.0, 1.0], [2.0, 0.5]])
    q = quantize_ternary(weight, n_per_class=1)
    assert q.codes.tolist() == [[-1, 0], [1, 0]]
    assert q.scale == pytest.approx(3.5)


def test_ties_at_the_boundary_are_all_dropped():
    weight = torch.tensor([[3.0, 1.0], [1.0, 0.5]])
    q = quantize_ternary(weight, n_per_class=1)  # K = 2, but the 2nd and 3rd magnitudes tie at 1
    assert q.codes.tolist() == [[1, 0], [0, 0]]
    assert q.nnz <= 2
    assert q.scale == pytest.approx(3.0)


def test_budget_larger_than_nonzeros_keeps_every_nonzero():
    weight = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    with pytest.warns(UserWarning, match="budget of 10 weights .* is at least the 4 weights of a 2 x 2 layer"):
        q = quantize_ternary(weight, n_per_class=5)
    assert q.codes.tolist() == [[1, 0], [0, -1]]
    assert q.scale == pytest.approx(1.5)


def test_fractional_budget_is_floored_as_in_the_reference():
    weight = torch.tensor([[3.0, -2.0, 1.0]])
    assert quantize_ternary(weight, n_per_class=1.5).codes.tolist() == [[1, 0, 0]]  # floor(1.5 * 1) = 1
    assert quantize_ternary(weight, n_per_class=2.99).codes.tolist() == [[1, -1, 0]]
    # 0.29 * 100 is 28.999999999999996 in float: the budget is still 29.
    many = torch.arange(1, 301, dtype=torch.float32).reshape(100, 3)
    assert quantize_ternary(many, n_per_class=0.29).nnz == 29


def test_exact_per_class_and_binary():
    weight = torch.tensor([[0.1, -3.0, 2.0, 0.5], [1.0, 0.9, -0.2, 0.0]])
    q = quantize_ternary(weight, n_per_class=2, exact_per_class=True)
    assert q.codes.tolist() == [[0, -1, 1, 0], [1, 1, 0, 0]]
    assert (q.codes != 0).sum(dim=1).tolist() == [2, 2]
    b = quantize_ternary(weight, n_per_class=1, binary=True)
    assert b.codes.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]
    assert b.scale == pytest.approx(1.5)
    assert (b.codes >= 0).all()


@pytest.mark.parametrize(
    "weight, kwargs, message",
    [
        (torch.ones(2, 3), {"n_per_class": 0}, "positive"),
        (torch.ones(2, 3), {"n_per_class": 0.1}, "impossible budget"),
        (torch.ones(2, 3), {"n_per_class": 4, "exact_per_class": True}, "only 3 features"),
        (torch.tensor([[1.0, 0, 0], [1.0, 1.0, 0]]), {"n_per_class": 2, "exact_per_class": True}, "classes \\[0\\]"),
        (torch.zeros(2, 3), {}, "no non-zero"),
        (-torch.ones(2, 3), {"binary": True}, "no positive"),
        (torch.ones(3), {}, "2-D"),
        (torch.tensor([[1.0, float("nan")]]), {}, "NaN"),
        (torch.ones(2, 2), {"n_per_class": 1}, "tie"),
    ],
)
def test_impossible_or_bad_inputs_raise(weight, kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_ternary(weight, **kwargs)


def test_bias_rule_known_answer():
    codes = torch.tensor([[1, 1, 0], [1, -1, 0], [-1, -1, 0]], dtype=torch.int8)
    dense_bias = torch.tensor([0.5, -3.0, 1.0])  # B = 3
    # Net counts 2, 0, -2: the most positive class gets -B, the most negative +B, linear in between.
    assert ternary_bias(codes, dense_bias).tolist() == pytest.approx([-3.0, 0.0, 3.0])


def test_bias_rule_equal_net_counts_gives_zero_not_nan():
    codes = torch.tensor([[1, -1], [0, 0], [1, -1]], dtype=torch.int8)
    bias = ternary_bias(codes, torch.tensor([1.0, 2.0, -4.0]))
    assert torch.equal(bias, torch.zeros(3))


def test_bias_rule_validates_shapes():
    with pytest.raises(ValueError, match="codes must be C x F"):
        ternary_bias(torch.zeros(3, 2, dtype=torch.int8), torch.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        ternary_bias(torch.zeros(1, 2, dtype=torch.int8), torch.tensor([float("nan")]))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 13), (200, 50), (5, 3, 3)])
def test_packing_round_trips_exactly(shape):
    codes = torch.randint(-1, 2, shape, dtype=torch.int8)
    packed = pack_ternary(codes)
    count = codes.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == (count + 3) // 4
    assert torch.equal(unpack_ternary(packed, shape), codes)


def test_packing_rejects_bad_data():
    with pytest.raises(ValueError, match="only -1, 0 and \\+1"):
        pack_ternary(torch.tensor([2], dtype=torch.int8))
    packed = pack_ternary(torch.ones(10, dtype=torch.int8))
    with pytest.raises(ValueError, match="truncated"):
        unpack_ternary(packed[:-1], (10,))
    with pytest.raises(ValueError, match="invalid 2-bit value"):
        unpack_ternary(torch.tensor([0b11], dtype=torch.uint8), (1,))
    with pytest.raises(ValueError, match="uint8"):
        unpack_ternary(packed.to(torch.int8), (10,))
