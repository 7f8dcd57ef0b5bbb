"""Degradation operators: exact adjoints (<Ax, y> = <x, A^T y>), seeded randomness, expected structure."""

import pytest
import torch

from diffusers_pafm.flow_maps import OPERATORS, MatrixOperator, build_operator


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_transpose_is_the_adjoint_and_randomness_is_seeded(name):
    shape = (3, 2, 16, 16)
    op = build_operator(name, shape, torch.Generator().manual_seed(0))
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randn_like(op(x))
    lhs, rhs = (op(x) * y).sum(), (x * op.transpose(y)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)
    again = build_operator(name, shape, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again(x), op(x))
    assert op.pseudo_inverse(op(x)).shape == x.shape


def test_operator_structure():
    x = torch.rand(2, 3, 16, 16)
    sr = build_operator("super_resolution_4x", x.shape)
    assert sr(x).shape == (2, 3, 4, 4)
    torch.testing.assert_close(sr(x)[0, 0, 0, 0], x[0, 0, :4, :4].mean())
    box = build_operator("box_inpaint", x.shape, torch.Generator().manual_seed(1))
    hidden = 1 - box.mask.mean((1, 2, 3))
    assert ((hidden >= 1 / 16) & (hidden < 1 / 4 + 1e-6)).all()  # sides in [h/4, h/2)
    blur = build_operator("gaussian_blur", x.shape)
    torch.testing.assert_close(blur(torch.ones_like(x)), torch.ones_like(x))  # kernels sum to one
    assert blur(x).std() < x.std()
    inpaint = build_operator("random_inpaint", (64, 1, 16, 16), torch.Generator().manual_seed(2))
    assert 0.25 < 1 - inpaint.mask.mean() < 0.75
    observe_first = MatrixOperator(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(observe_first(torch.tensor([[2.0, 5.0]])), torch.tensor([[2.0]]))
    with pytest.raises(ValueError, match="unknown degradation"):
        build_operator("jpeg", x.shape)
