"""Shared pytest fixtures."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def cellpose_weights(tmp_path_factory):
    """A tiny Cellpose 4 state dict whose flows point to the centre of every 8 x 8 block.

    Cellpose 4 loads any state dict with a ``W2`` entry (non-strict) and builds its ViT with
    random weights; with the read-out weights zero and its bias set to the flows of one
    8 x 8 cell (computed by Cellpose's own ``masks_to_flows_gpu``) and a high cell
    probability, the network output no longer depends on the random encoder. The real
    load -> normalise -> tile -> network -> flow-dynamics path then returns a grid of 8 x 8
    masks aligned with the 256-pixel tile. Built once per session (~2 GB when loaded).
    """
    import torch
    from cellpose import dynamics

    ps, nout = 8, 3  # CPSAM's token size and outputs (dy, dx, cell probability)
    blocks = np.kron(np.arange(1, 10).reshape(3, 3), np.ones((ps, ps), int)).astype(np.int32)
    flows, _ = dynamics.masks_to_flows_gpu(blocks, device=torch.device("cpu"))
    bias = np.zeros((nout, ps, ps), np.float32)
    bias[:2] = 5.0 * flows[:, ps : 2 * ps, ps : 2 * ps]  # Cellpose nets predict 5 x unit flows
    bias[2] = 5.0  # cell-probability logit: every pixel belongs to a cell
    state = {
        "W2": torch.eye(nout * ps**2).reshape(nout * ps**2, nout, ps, ps),
        "out.weight": torch.zeros(nout * ps**2, 256, 1, 1),
        "out.bias": torch.from_numpy(bias.reshape(-1)),
    }
    path = tmp_path_factory.mktemp("cellpose") / "cellbg_test_cp4.pth"
    torch.save(state, path)
    return path
