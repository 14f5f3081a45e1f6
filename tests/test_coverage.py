"""gradgraph.coverage: per module captured / bare / glue / frozen / refused (with the reason), the neuron spaces
found, from one forward pass; a refusal is reported, not raised."""
from __future__ import annotations

import torch
from test_zoo_bare import Refused, TinyViT
from torch import nn

import gradgraph

D = torch.float64


def test_coverage_of_a_vit_with_bare_parameters():
    torch.manual_seed(0)
    report = gradgraph.coverage(TinyViT().double(), torch.randn(2, 3, 4, 4, dtype=D))
    assert report.ok
    status = {m.path: m.status for m in report.modules}
    assert status[""] == "bare" and status["blocks.0"] == "bare" and status["blocks"] == "glue"
    assert status["patch"] == status["blocks.0.attn"] == status["head"] == "captured"
    by_path = {m.path: m for m in report.modules}
    assert sorted(by_path[""].ops) == ["cls", "pos", "temperature"]
    assert sorted(by_path["blocks.0"].ops) == ["blocks.0.gamma1", "blocks.0.gamma2"]
    spaces = {k: (perm, why) for k, _, perm, why in report.spaces}
    assert spaces["patch.out"] == (True, None) and spaces["head.out"] == (False, "model output")
    text = str(report)
    assert "patch.out [6] permutable" in text and "head.out [3] fixed: model output" in text


def test_coverage_reports_refusals_with_the_module():
    report = gradgraph.coverage(Refused("matmul"), torch.randn(4, 4))
    assert not report.ok and "'matmul'" in report.error
    root = report.modules[0]
    assert root.status == "refused" and "matmul" in root.reason
    m = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 4, bidirectional=True))
    report = gradgraph.coverage(m, torch.randn(2, 5, 3))
    status = {mc.path: (mc.status, mc.reason) for mc in report.modules}
    assert status["1"][0] == "refused" and "bidirectional" in status["1"][1]
    assert status["0"] == ("captured", None) and status[""] == ("glue", None)
    assert "refused: module '1' (torch.nn.modules.rnn.LSTM)" in str(report)


def test_coverage_of_frozen_and_sample_mixing_models():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    m[0].requires_grad_(False)
    report = gradgraph.coverage(m.train(), torch.randn(5, 3))
    assert not report.ok and "statistics of the current batch" in report.error
    assert {mc.path: mc.status for mc in report.modules}["1"] == "refused"
    report = gradgraph.coverage(m.eval(), torch.randn(5, 3))
    assert report.ok and [mc.status for mc in report.modules] == ["glue", "captured", "captured", "captured"]
