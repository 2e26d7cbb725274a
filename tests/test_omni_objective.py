"""The OmniMamba task losses' targets: answers only for mmu, image codes only for t2i."""

from __future__ import annotations

import torch
from conftest import make_omni_student

from mmdistill.omni_objective import answer_targets, code_targets


def test_answer_targets_cover_each_assistant_turn_and_its_end():
    # 1 2 = assistant prefix, 7 = end of turn; a user turn also ends with 7
    ids = torch.tensor([[9, 1, 2, 5, 5, 7, 3, 7, 1, 2, 6, 7, 4]])
    got = answer_targets(ids, [1, 2], [7])[0].int().tolist()
    assert got == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0]


def test_code_targets_are_the_codes_only(hovle):
    model = make_omni_student(hovle)
    spec = model.image_vocab.spec
    prompt = [spec.layout_id("<|t2i|>"), spec.layout_id("<|sot|>"), 20, 21]
    prompt += [spec.layout_id("<|eot|>"), spec.layout_id("<|soi|>")]
    codes = [spec.code_offset + c for c in (3, 0, 31, 7)]
    ids = torch.tensor([prompt + codes + [spec.layout_id("<|eoi|>")]])
    targets = code_targets(model, ids, torch.ones_like(ids))[0].tolist()
    assert targets == [-100] * 5 + [3, 0, 31, 7, -100]
