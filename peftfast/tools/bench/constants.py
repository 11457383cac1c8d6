"""The shapes, dtypes, GPUs and targets the bench's sections share (DESIGN, "Targets")."""
from __future__ import annotations

import torch

from .. import costmodel as cm

T_MODEL, D_MODEL, R_MODEL = 8192, 4096, 16  # the shape of the design targets
ACT, F32 = torch.bfloat16, torch.float32
GPUS = (cm.H100, cm.RTX4090)
SMS = {cm.H100.name: 132, cm.RTX4090.name: 128}  # streaming multiprocessors: the decode split depends on them
IA3_TARGET, DECODE_TARGET = 1.01, 1.05
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
