"""Judging: what a judge is asked (``signatures``), one predictor per question with verdicts mapped back to
the caller's order (``modules``), and the judge every program extends, with the batch runner (``judge``)."""
