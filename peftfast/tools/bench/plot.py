"""The PNG next to the JSON: modelled ratios per path (with targets) and a roofline of the kernels.

Everything plotted is modelled (``costmodel``). matplotlib is optional: ``plotting_available``
says whether it can be imported, and the command skips the plot (after writing the JSON) when
it cannot.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .. import costmodel as cm
from .constants import ACT, D_MODEL, F32, GPUS, R_MODEL, T_MODEL


def plotting_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_plot(rows: list[dict], path: Path) -> None:
    """Modelled ratios per path (with targets), and a roofline of the kernels of three paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, d, r = T_MODEL, D_MODEL, R_MODEL

    def both(impl, ad):
        return [k for bwd in (False, True) for k in cm.lora_layer(impl, bwd, t, d, d, r, ACT, ad, 0.1)]

    kernels = {"peftfast LoRA, p=0.1": both("peftfast", F32),
               "PEFT LoRA, bf16 adapters, p=0.1": both("peft", ACT),
               "peftfast QLoRA NF4, forward": cm.qlora_layer("peftfast", False, t, d, d, r, ACT, F32, 0.1)}
    fig, axes = plt.subplots(2, len(GPUS), figsize=(9.5 * len(GPUS), 11))
    for col, gpu in enumerate(GPUS):
        ax = axes[0][col]
        mine = [x for x in rows
                if x["section"] == "modelled" and x["gpu"] == gpu.name and "base" not in x["path"]]
        ys = np.arange(len(mine))
        ax.barh(ys - 0.2, [x["fwd_ratio_ovh"] for x in mine], 0.4, label="forward")
        ax.barh(ys + 0.2, [x.get("bwd_ratio_ovh", 0) for x in mine], 0.4, label="backward")
        for y, x in zip(ys, mine):
            for off, key in ((-0.2, "fwd_target"), (0.2, "bwd_target")):
                if key in x:
                    ax.plot([x[key]] * 2, [y + off - 0.2, y + off + 0.2], color="k", lw=2)
        ax.set_yticks(ys, [f"{x['op']}: {x['path']}" for x in mine], fontsize=6.5)
        ax.invert_yaxis()
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("modelled time / base matmul time (black ticks: targets)")
        ax.set_title(f"{gpu.name}: T={t}, d={d}, r={r}, bf16 (modelled from counted traffic, with launch "
                     "overhead)", fontsize=9)
        ax.legend(fontsize=8)
        ax = axes[1][col]
        intensity = np.logspace(-2, 4, 200)
        for peak, style, label in ((gpu.tensor_flops, "k-", "roof (bf16 tensor)"),
                                   (gpu.fp32_flops, "k--", "roof (fp32)")):
            ax.loglog(intensity, np.minimum(peak, gpu.bandwidth * intensity), style, lw=1, label=label)
        for (label, ks), marker in zip(kernels.items(), "o^s"):
            pts = [(k.flops / k.bytes, k.flops / k.time(gpu)) for k in ks if k.bytes and k.flops]
            ax.scatter(*zip(*pts), marker=marker, label=label, alpha=0.7)
        ax.set_xlabel("arithmetic intensity (FLOP / byte)")
        ax.set_ylabel("modelled FLOP/s")
        ax.set_title(f"{gpu.name}: roofline of each kernel launch (modelled)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
