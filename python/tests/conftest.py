import importlib.util
import os
import sys

import pytest
import torch

# Run from the source tree without installing: python/ on the path when no dma_torch is found
# at all (its _C must then have been built in place: setup.py build_ext --inplace). An installed
# one, or PYTHONPATH, wins; an import error of that one is reported, not papered over.
if importlib.util.find_spec("dma_torch") is None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_report_header(config):
    import dma_torch
    return f"torch {torch.__version__}, dma_torch {dma_torch.__file__}, {dma_torch.build_info()}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
