"""One shared tester for every model: a case says how to build it, what goes in, what comes out.

A test module subclasses :class:`ModelTester` once per architecture (as
segmentation_models.pytorch does) and inherits every check: output shapes,
finite outputs, gradients reaching every trainable parameter, and an identical
model rebuilt from a checkpoint with the builder inference uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.checkpoint import rebuild_model, save_checkpoint
from common.config import to_dict


class ModelTester:
    """Subclass and set ``stage``, ``schema``, ``builder``; implement ``config`` and ``inputs``."""

    stage: str
    schema: type
    builder: Any

    def config(self) -> Any:
        """The full stage config (a ``schema`` instance) whose ``.model`` builds the network."""
        raise NotImplementedError

    def inputs(self) -> torch.Tensor:
        raise NotImplementedError

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Output name -> shape (a tensor output is named "out")."""
        raise NotImplementedError

    def call(self, model: nn.Module, x: torch.Tensor) -> Any:
        """Run the model on ``inputs()`` (override for models with more arguments)."""
        return model(x)

    def scalar(self, output: Any) -> torch.Tensor:
        """A scalar to back-propagate from the output."""
        return sum(v.float().sum() for v in _as_dict(output).values())

    # ---- the checks every case inherits --------------------------------------------
    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return type(self).builder(self.config().model)

    def test_output_shapes_and_finite(self):
        model = self.build().eval()
        with torch.no_grad():
            out = _as_dict(self.call(model, self.inputs()))
        assert {k: tuple(v.shape) for k, v in out.items()} == self.expected_shapes()
        assert all(torch.isfinite(v).all() for v in out.values())

    def test_gradients_reach_every_parameter(self):
        model = self.build().train()
        self.scalar(self.call(model, self.inputs())).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"no gradient for {missing[:5]}"
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    def test_rebuilt_from_checkpoint_gives_the_same_outputs(self, tmp_path: Path):
        model = self.build().eval()
        path = tmp_path / "best.pt"
        save_checkpoint(path, stage=self.stage, model_state=model.state_dict(),
                        config=to_dict(self.config()), fold=0, epoch=0)
        rebuilt, cfg = rebuild_model(path, self.stage, self.schema, type(self).builder)
        assert cfg == self.config()
        x = self.inputs()
        with torch.no_grad():
            a, b = _as_dict(self.call(model, x)), _as_dict(self.call(rebuilt, x))
        assert all(torch.equal(a[k], b[k]) for k in a)


def _as_dict(output: Any) -> dict[str, torch.Tensor]:
    return output if isinstance(output, dict) else {"out": output}
