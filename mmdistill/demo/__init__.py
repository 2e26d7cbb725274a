"""The embedded demo: a small multimodal teacher that knows its shapes.

:mod:`mmdistill.demo.teacher` trains (or ships) ``builtin:shapes-hovle``, a HoVLE-format model
trained from scratch on the generated shape images of :mod:`mmdistill.data.synthetic`;
:mod:`mmdistill.demo.questions` measures held-out answer accuracy for it and for its
students (:func:`~mmdistill.demo.questions.evaluate_answers`).
"""
