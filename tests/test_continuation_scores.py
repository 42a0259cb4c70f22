"""Engine.continuation_scores: per-row sums and greedy flags equal the full forward's, whatever fills the
rest of the fixed-size batch (rows with or without images)."""
import jax
import numpy as np

from test_generate import TOKENS, make_prompt
from wings_fixtures import tiny_model
from wings_jax.inference import Engine


def _expected(engine, prompt, k):
    logits = engine.logits([prompt])[0]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    n = len(prompt.tokens)
    targets = prompt.tokens[n - k:]
    picked = logp[np.arange(n - k - 1, n - 1), targets]
    return picked.sum(), bool(np.all(logits[np.arange(n - k - 1, n - 1)].argmax(-1) == targets))


def test_partial_batches_with_image_rows_score_each_row_alone():
    engine = Engine(tiny_model())
    with_image = engine.with_image_features(make_prompt(20, num_images=1, seed=1))
    text_only = make_prompt(11, seed=2)
    assert with_image.images.shape[:2] == (1, TOKENS)  # tower outputs, not pixels
    rows = [(with_image, 4), (text_only, 3)]
    totals, greedy = engine.continuation_scores(rows, batch_size=4)  # two padding rows
    for (prompt, k), total, g in zip(rows, totals, greedy):
        raw = make_prompt(20, num_images=1, seed=1) if prompt is with_image else prompt
        want, want_greedy = _expected(engine, raw, k)
        np.testing.assert_allclose(total, want, rtol=1e-5, atol=1e-5)
        assert g == want_greedy
    # a row whose continuation is the model's own argmax is greedy
    logits = engine.logits([text_only])[0]
    grown = text_only._replace(tokens=np.append(text_only.tokens, np.int32(logits[-1].argmax())),
                               positions=np.arange(12, dtype=np.int32), text_mask=np.ones(12, bool))
    assert engine.continuation_scores([(grown, 1)], batch_size=2)[1][0]
