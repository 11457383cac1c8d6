"""LoRA+ optimizer (``peftfast.optimizers.create_loraplus_optimizer``) against PEFT's: same parameter groups (by
parameter name), learning rates and weight decays, and the same first steps of training."""
import copy

import peft
import peft.optimizers
import pytest
import torch
from torch import nn

import peftfast
import peftfast.optimizers


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(37, 13)
        self.lin0 = nn.Linear(13, 19)
        self.norm = nn.LayerNorm(19)
        self.lin1 = nn.Linear(19, 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.norm(self.lin0(self.emb(ids)))).sum(1)


def groups_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


@pytest.mark.parametrize("bias", ["none", "all"])
def test_groups_and_training_steps_match_peft(bias):
    torch.manual_seed(0)
    base = Net()
    ids = torch.randint(0, 37, (5, 11))
    target = torch.randn(5, 7)
    results, start = {}, None
    for lib, opt_lib in ((peft, peft.optimizers), (peftfast, peftfast.optimizers)):
        config = lib.LoraConfig(target_modules=["emb", "lin0", "lin1"], modules_to_save=["norm"], bias=bias,
                                init_lora_weights=False)
        model = lib.get_peft_model(copy.deepcopy(base), config)
        if start is None:  # the same random adapter weights in both models
            start = {n: p.detach().clone() for n, p in model.named_parameters()}
        else:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(start[n])
        opt = opt_lib.create_loraplus_optimizer(model, torch.optim.AdamW, lr=3e-3, loraplus_lr_ratio=16.0,
                                                loraplus_weight_decay=0.1, loraplus_lr_embedding=2e-4,
                                                betas=(0.8, 0.95))
        losses = []
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(model(ids), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results[lib.__name__] = (groups_by_name(model, opt), losses, opt.defaults["betas"])
    ours, theirs = results["peftfast"], results["peft"]
    assert ours[0] == theirs[0]
    assert all(g[0] for g in ours[0])  # every group holds parameters here
    assert ours[2] == theirs[2] == (0.8, 0.95)
    torch.testing.assert_close(torch.tensor(ours[1]), torch.tensor(theirs[1]), rtol=1e-5, atol=1e-7)
