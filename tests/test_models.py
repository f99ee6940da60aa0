"""Every network of the project through the one shared tester (tests/model_tester.py)."""
from __future__ import annotations

import torch

from common.config import load_config
from stage1_seg.config import Stage1Config
from stage1_seg.model import build_model as build_segmenter
from stage2_cls.config import Stage2Config
from stage2_cls.model import build_model as build_classifier
from tests.model_tester import ModelTester


class _Segmenter(ModelTester):
    stage, schema, builder = "stage1", Stage1Config, build_segmenter
    overrides: list[str] = []
    channels = 1

    def config(self):
        return load_config(Stage1Config, None, ["model.decoder_channels=[32,16,16,8,8]",
                                                f"model.in_channels={self.channels}", *self.overrides])

    def inputs(self):
        return torch.rand(1, self.channels, 32, 64, 32, generator=torch.Generator().manual_seed(1))

    def expected_shapes(self):
        return {"out": (1, 7, 32, 64, 32)}


class TestSegmenterEfficientNetB0(_Segmenter):
    overrides = ["model.encoder=efficientnet-b0"]


class TestSegmenterEfficientNetV2B0(_Segmenter):
    overrides, channels = ["model.encoder=tu-tf_efficientnetv2_b0"], 3


class _Classifier(ModelTester):
    stage, schema, builder = "stage2", Stage2Config, build_classifier
    overrides: list[str] = []

    def config(self):
        return load_config(Stage2Config, None, ["model.lstm_hidden=16", "model.drop_path=0.0", *self.overrides])

    def inputs(self):
        return torch.rand(2, 5, 6, 32, 32, generator=torch.Generator().manual_seed(1))

    def expected_shapes(self):
        shapes = {"slice_logits": (2, 5)}
        if "model.pooling=attention" in self.overrides:
            shapes["attention"] = (2, 5)
        return shapes


class TestClassifierConvNeXtMean(_Classifier):
    overrides = ["model.backbone=convnext_atto"]


class TestClassifierConvNeXtAttention(_Classifier):
    overrides = ["model.backbone=convnext_atto", "model.pooling=attention"]


class TestClassifierResNet18(_Classifier):
    overrides = ["model.backbone=resnet18"]


class TestPatientClassifier(_Classifier):
    """Type 2: a whole study per sample; the learned overall head beside the slice logits."""

    overrides = ["model.backbone=resnet18", "model.type=2", "model.checkpoint_chunk=8"]

    def inputs(self):
        return torch.rand(2, 7, 3, 6, 32, 32, generator=torch.Generator().manual_seed(1))

    def call(self, model, x):
        missing = torch.zeros(2, 7, dtype=torch.bool)
        missing[1, 6] = True
        return model(x, missing)

    def expected_shapes(self):
        return {"slice_logits": (2, 7, 3), "overall_logit": (2,)}


class TestPatientClassifierNoisyOrHead(TestPatientClassifier):
    """Type 2 with the patient head as a correction to the noisy-OR of its own vertebrae."""

    overrides = ["model.backbone=resnet18", "model.type=2", "model.overall_head=noisy_or"]
