import pytest
import torch


@pytest.fixture
def float64():
    """Exact comparisons in double precision: rounding must not hide a wrong formula."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
