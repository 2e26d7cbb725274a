"""The embedded demo: a small multimodal teacher that knows its shapes, and its students.

:mod:`mmdistill.demo.teacher` is the shipped teacher ``builtin:shapes-hovle`` (a HoVLE-format
model trained from scratch on the generated shape images of :mod:`mmdistill.data.synthetic`);
:mod:`mmdistill.demo.questions` measures held-out answer accuracy for it and for its students
(:func:`~mmdistill.demo.questions.evaluate_answers`). :mod:`mmdistill.demo.pipeline` runs the demo end to end. The teacher's builder
(:mod:`mmdistill.demo.teacher_builder`, with ``teacher_config``, ``teacher_data`` and
``teacher_warmup``) trains it on the ``builtin:shapes`` conversations, tokenised as ``mmdistill
run`` tokenises them; only ``scripts/build_demo_teacher.py`` and the tests import it.
"""
