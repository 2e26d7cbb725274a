"""Quality of a student against its teacher: perplexity, KL, top-1 agreement and answer accuracy.

:func:`evaluate` (one student) and :func:`evaluate_many` (several students sharing one teacher
forward per batch) read text and conversation data, run teacher and students on the same token
sequences, and return plain dicts (the ``--json`` document of ``mmdistill eval``).

**Data** (:mod:`.prepare`). ``.txt`` files are one document each. ``.jsonl`` files hold one record
per line: ``{"text": ...}`` is a document; ``{"conversations": [...], "image": path | [paths]}`` is
a conversation as :mod:`mmdistill.chat` parses it for training too (``from``/``value`` or
``role``/``content`` turns, any-case speakers, the ``<image>`` rule; image paths relative to the
JSONL file).

**What is scored.** Documents are cut into windows of ``seq_len`` tokens; consecutive windows
share one token, so every token of a document but its first is predicted exactly once, from the
context inside its window (:mod:`.documents`; no context carries across windows). Conversations
are rendered with the model's chat format (:mod:`mmdistill.chat_format`: HoVLE's
``internlm2-chat`` with image tokens expanded, the tokenizer's Jinja template for HF models, or
``question\\nanswer\\n`` when there is none), tokenised whole and scored on the answer tokens only:
each assistant turn's text and the template's end-of-turn marker (:mod:`.conversations`).
``max_tokens`` caps the scored tokens of each file (the last window or record is cut short).

**Metrics** (:mod:`mmdistill.metrics`), over scored tokens, natural log:
``teacher_nll``/``student_nll`` (mean negative log-likelihood of the data),
``teacher_ppl``/``student_ppl`` = exp of those, ``kl`` = mean KL(teacher ‖ student) =
``Σ_v p_T(v) (log p_T(v) − log p_S(v))`` per token, ``top1_agreement`` = share of tokens where
both models' argmax agree. For conversation records of question/answer data (``"task": "qa"``, or
no ``task`` and a one-word reference answer), each answer is also generated greedily after the
question (earlier turns given with their reference answers; :mod:`mmdistill.answers`) and compared
with :func:`mmdistill.data.synthetic.answer_accuracy`.

Modules: :mod:`.models` (loading), :mod:`.documents`, :mod:`.conversations` and :mod:`.prepare`
(data), :mod:`.scoring`, :mod:`.runner` (the reports), :mod:`.harness` (lm-evaluation-harness).
"""

from ..answers import Question
from .documents import ScoredSequence
from .harness import lm_eval_available, run_lm_eval
from .models import describe, is_student_dir, load_model, tokenizer_for
from .prepare import EvalFile, prepare_file
from .runner import evaluate, evaluate_many

__all__ = [
    "EvalFile",
    "Question",
    "ScoredSequence",
    "describe",
    "evaluate",
    "evaluate_many",
    "is_student_dir",
    "lm_eval_available",
    "load_model",
    "prepare_file",
    "run_lm_eval",
    "tokenizer_for",
]
