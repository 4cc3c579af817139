"""``lbdpo.eval.prompt_stats``: each prompt's log PPL and h from padded batches equal a brute-force computation,
one unpadded prompt at a time through the model's own logits and hidden states."""

from __future__ import annotations

import torch

from lbdpo.eval.prompt_stats import prompt_features, table


def test_prompt_features_match_one_prompt_at_a_time(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (5, 2, 9, 7, 3)]
    got = prompt_features(model, prompts, tokenizer.pad_token_id, batch_size=3)  # padded batches of 3 and 2
    assert got["tokens"] == [5, 2, 9, 7, 3]
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        lp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        h = out.hidden_states[-1][0, -1]
        torch.testing.assert_close(got["log_ppl"][i], -lp.mean().item(), atol=1e-5, rtol=0)
        torch.testing.assert_close(got["h_l2"][i], h.norm().item(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got["h_l1"][i], h.abs().sum().item(), atol=1e-3, rtol=1e-5)

    rows = [{"domain": d} for d in ("en", "zh", "en", "zh", "en")]
    lines = table(rows, got).splitlines()
    assert [line.split(" | ")[0:2] for line in lines[2:]] == [["| en", "3"], ["| zh", "2"]]
    en_l2 = sum(got["h_l2"][i] for i in (0, 2, 4)) / 3
    assert f"| {en_l2:.1f} |" in lines[2]
