"""The tolerance rule's absolute floor where the reference is exactly zero (issue 10 item 7)."""
import pytest
import torch

from softprompt_kernels.testing import compare


def test_issue10_item7_small_error_on_zero_reference_passes():
    ref = torch.zeros(4, 8, dtype=torch.float64)
    plain = torch.zeros(4, 8)
    ours = torch.zeros(4, 8)
    ours[1, 2] = 6e-7
    assert compare("dk", ours, plain, ref).ok
    ours[1, 2] = 1e-3
    assert not compare("dk", ours, plain, ref).ok


def test_issue10_item7_floor_only_at_zero_elements_and_tied_to_scale():
    ref = torch.zeros(16, dtype=torch.float64)
    ref[:8] = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)
    plain = ref.float()  # exact up to float32 rounding
    ours = plain.clone()
    ours[12] = 6e-7  # zero-reference element: within the floor
    assert compare("x", ours, plain, ref).ok
    assert not compare("x", ours, plain, ref, scale=1e-3).ok  # tiny inputs: a tiny floor
    ours = plain.clone()
    ours[3] += 6e-7  # nonzero-reference element: the plain rule, no floor (bound ~1.2e-7 here)
    c = compare("x", ours, plain, ref)
    assert not c.ok and c.floor > 6e-7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_issue10_item7_floor_scales_with_dtype(dtype):
    ref = torch.zeros(8, dtype=torch.float64)
    ours = torch.zeros(8, dtype=dtype)
    ours[0] = 8 * torch.finfo(dtype).eps * 0.9
    assert compare("x", ours, ours.new_zeros(8), ref).ok
    ours[0] = 8 * torch.finfo(dtype).eps * 1.5
    assert not compare("x", ours, ours.new_zeros(8), ref).ok
