"""Log-probabilities through the server against plain forwards of each budget's model (fp32, 1e-5):
completions' `logprobs` / `echo` / `n`, chat's `logprobs` / `top_logprobs`, the think / answer split,
and /v1/models' parameter counts."""

from __future__ import annotations

import httpx
import pytest
import torch
from server_helpers import NAME, serve, tiny_budget_server

from star_elastic import accounting
from star_elastic.data.tokenizer import format_prompt
from star_elastic.infer.generate import GenerationConfig, generate
from star_elastic.serve import schemas

RAW = {"skip_special_tokens": False}
TOL = 1e-5


@pytest.fixture(scope="module")
def server():
    return tiny_budget_server()


@pytest.fixture(scope="module")
def live(server):
    with serve(server, max_batch=16) as bg:
        yield bg


def post(bg, path: str, body: dict) -> dict:
    """A 200's body, checked against the response model /openapi.json documents."""
    r = httpx.post(bg.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    model = schemas.ChatResponse if "chat" in path else schemas.CompletionResponse
    model.model_validate(r.json(), strict=True)
    return r.json()


def text_of(server, token: int) -> str:
    return server.parent.tokenizer.decode([token], skip_special_tokens=False)


def ids_of(server, texts: list[str]) -> list[int]:
    """Token texts back to ids: the demo tokenizer's tokens have distinct texts."""
    tok = server.parent.tokenizer
    vocab = {tok.decode([i], skip_special_tokens=False): i for i in range(len(tok))}
    assert len(vocab) == len(tok)
    return [vocab[t] for t in texts]


@torch.no_grad()
def reference(model, ids: list[int], start: int) -> torch.Tensor:
    """log_softmax rows (fp32) that predict ids[start:], from one plain forward over all of ids."""
    logits = model(torch.tensor([ids]))[0].float()
    return torch.log_softmax(logits, -1)[start - 1 : len(ids) - 1]


def assert_legacy_matches(server, got: dict, ids: list[int], ref: torch.Tensor, k: int) -> None:
    """A legacy `logprobs` slice (token_logprobs, top_logprobs) against reference rows."""
    assert len(got["token_logprobs"]) == len(ids) == ref.shape[0]
    for lp, top, token, row in zip(got["token_logprobs"], got["top_logprobs"], ids, ref):
        assert lp == pytest.approx(float(row[token]), abs=TOL)
        values, alts = row.topk(k)
        want = {text_of(server, int(a)): float(v) for a, v in zip(alts, values)}
        want[text_of(server, token)] = float(row[token])
        assert set(top) == set(want)
        for key, value in want.items():
            assert top[key] == pytest.approx(value, abs=TOL)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_completion_logprobs_equal_the_models_log_softmax(live, server, temperature):
    """Sampled tokens too: the raw distribution's log-probabilities, not the tempered one's."""
    prompt, k = [9, 20, 30, 11, 12], 5
    out = post(live, "/v1/completions", {"model": f"{NAME}@0.5", "prompt": prompt, "max_tokens": 10,
                                         "temperature": temperature, "top_p": 0.9, "seed": 4, "logprobs": k} | RAW)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    ids = ids_of(server, lp["tokens"])
    assert_legacy_matches(server, lp, ids, reference(server.model(0.5), prompt + ids, len(prompt)), k)
    assert "".join(lp["tokens"]) in (choice["text"], choice["text"] + "</s>")  # the final eos is listed
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(ids))]
    assert choice["logprob_budgets"] == [{"part": "answer", "budget": 0.5, "start": 0, "end": len(ids)}]
    if temperature == 0:
        want = generate(server.model(0.5), [prompt], GenerationConfig(max_new_tokens=10, stop_token_ids=(2,)))[0]
        assert ids == want


def test_echo_scores_the_prompt_like_a_forward_pass(live, server):
    """lm-eval's loglikelihood request: token-id prompts of several lengths, echo, max_tokens 0 or 1."""
    prompts, k = [[9, 20, 30, 11, 12], [5, 6], [40, 41, 42, 43, 44, 45, 46, 47, 8]], 2
    model = server.model(0.75)
    for max_tokens in (0, 1):
        out = post(live, "/v1/completions", {"model": f"{NAME}@0.75", "prompt": prompts, "max_tokens": max_tokens,
                                             "echo": True, "logprobs": k, "temperature": 0} | RAW)
        for prompt, choice in zip(prompts, sorted(out["choices"], key=lambda c: c["index"])):
            lp = choice["logprobs"]
            ids = ids_of(server, lp["tokens"])
            assert ids[: len(prompt)] == prompt and len(ids) == len(prompt) + max_tokens
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            got = {key: value[1:] for key, value in lp.items() if key != "text_offset"}
            assert_legacy_matches(server, got, ids[1:], reference(model, ids, 1), k)
            assert choice["text"] == "".join(text_of(server, t) for t in prompt) + "".join(lp["tokens"][len(prompt):])
            assert choice["logprob_budgets"][0] == {"part": "prompt", "budget": 0.75, "start": 0, "end": len(prompt)}
        assert out["usage"]["prompt_tokens"] == sum(map(len, prompts))


def test_lm_eval_reads_the_echoed_loglikelihood(live, server):
    """lm-eval's own parser on our response: the continuation's summed log-probability and greediness."""
    parse = pytest.importorskip("lm_eval.models.openai_completions").LocalCompletionsAPI.parse_logprobs
    context, continuation = [9, 20, 30, 11], [12, 13, 14]
    body = {"model": f"{NAME}@0.5", "prompt": [context + continuation], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    ((loglik, greedy),) = parse(post(live, "/v1/completions", body), ctxlens=[len(context)])
    ref = reference(server.model(0.5), context + continuation, len(context))
    assert loglik == pytest.approx(sum(float(row[t]) for row, t in zip(ref, continuation)), abs=3 * TOL)
    assert greedy == all(int(row.argmax()) == t for row, t in zip(ref, continuation))


def test_n_choices_differ_and_each_repeats_with_its_seed(live):
    body = {"model": f"{NAME}@0.5", "prompt": "7*8=", "max_tokens": 12, "temperature": 1.0} | RAW
    out = post(live, "/v1/completions", body | {"n": 4, "seed": 7})
    texts = [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    assert len(set(texts)) > 1
    for j, text in enumerate(texts):  # choice j == a one-choice request seeded seed + j
        assert post(live, "/v1/completions", body | {"seed": 7 + j})["choices"][0]["text"] == text
    assert out["usage"]["prompt_tokens"] == post(live, "/v1/completions", body)["usage"]["prompt_tokens"]
    chat = {"model": f"{NAME}@0.5", "messages": [{"role": "user", "content": "7*8=?"}], "max_tokens": 6,
            "max_think_tokens": 6, "temperature": 1.0, "seed": 3} | RAW
    pair = post(live, "/v1/chat/completions", chat | {"n": 2})["choices"]
    assert pair[1]["message"] == post(live, "/v1/chat/completions", chat | {"seed": 4})["choices"][0]["message"]


def test_k_past_its_bound_is_a_400(live):
    r = httpx.post(live.url + "/v1/completions", json={"model": NAME, "prompt": "1", "logprobs": 21}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    chat = {"model": NAME, "messages": [{"role": "user", "content": "1"}], "logprobs": True}
    r = httpx.post(live.url + "/v1/chat/completions", json=chat | {"top_logprobs": 21}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    out = post(live, "/v1/completions", {"model": f"{NAME}@1", "prompt": [9, 10], "max_tokens": 1, "logprobs": 20})
    assert len(out["choices"][0]["logprobs"]["top_logprobs"][0]) in (20, 21)  # the top 20, and the token's own


@pytest.mark.parametrize("think,answer", [(0.5, 1.0), (0.75, 0.75)])
def test_think_and_answer_logprobs_come_from_their_budgets(live, server, think, answer):
    """The trace's log-probabilities are the think budget's, the answer's (and an echoed prompt's) the
    answer budget's; `logprob_budgets` says which range is whose. (0.75, 0.75): the answer continues
    the trace's cache in place."""
    tok = server.parent.tokenizer
    prompt = tok.encode(format_prompt(tok, "1+2=?"), add_special_tokens=False)
    res = server.generate([prompt], think, answer, max_think_tokens=6, max_answer_tokens=6).results[0]
    trace, ans = res.think_tokens, res.answer_tokens
    think_ref = reference(server.model(think), prompt + trace, len(prompt))
    answer_ref = reference(server.model(answer), prompt + trace + ans, len(prompt + trace))
    settings = {"think_budget": think, "answer_budget": answer, "max_think_tokens": 6, "max_tokens": 6,
                "temperature": 0} | RAW

    chat = post(live, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "1+2=?"}],
                                               "logprobs": True, "top_logprobs": 2} | settings)["choices"][0]
    reasoning, content = chat["logprobs"]["reasoning_content"], chat["logprobs"]["content"]
    body = ans[:-1] if ans and ans[-1] == server.eos_id else ans
    assert [e["token"] for e in reasoning] == [text_of(server, t) for t in trace[:-1]]  # </think> is not reasoning
    assert [e["token"] for e in content] == [text_of(server, t) for t in body]
    for entries, ids, ref in ((reasoning, trace[:-1], think_ref), (content, body, answer_ref)):
        for e, t, row in zip(entries, ids, ref):
            assert e["logprob"] == pytest.approx(float(row[t]), abs=TOL)
            assert [a["logprob"] for a in e["top_logprobs"]] == pytest.approx(row.topk(2).values.tolist(), abs=TOL)
    assert chat["logprob_budgets"] == [{"part": "reasoning", "budget": think, "start": 0, "end": len(trace) - 1},
                                       {"part": "answer", "budget": answer, "start": 0, "end": len(body)}]

    out = post(live, "/v1/completions", {"model": NAME, "prompt": prompt, "echo": True, "logprobs": 0} | settings)
    lp = out["choices"][0]["logprobs"]
    assert ids_of(server, lp["tokens"]) == prompt + trace + ans
    prompt_ref = reference(server.model(answer), prompt, 1)
    want = ([None] + [float(row[t]) for row, t in zip(prompt_ref, prompt[1:])]
            + [float(row[t]) for row, t in zip(think_ref, trace)] + [float(row[t]) for row, t in zip(answer_ref, ans)])
    if res.forced_end_of_think:  # the closing </think> was forced, not sampled: no log-probability
        want[len(prompt) + len(trace) - 1] = None
    assert lp["token_logprobs"] == [w if w is None else pytest.approx(w, abs=TOL) for w in want]
    text, shown = out["choices"][0]["text"], len(prompt) + len(trace) + len(body)  # the eos is not in the text
    assert all(text[off:].startswith(t) for off, t in zip(lp["text_offset"][:shown], lp["tokens"]))
    n_prompt, n_trace = len(prompt), len(prompt) + len(trace)
    assert out["choices"][0]["logprob_budgets"] == [
        {"part": "prompt", "budget": answer, "start": 0, "end": n_prompt},
        {"part": "reasoning", "budget": think, "start": n_prompt, "end": n_trace},
        {"part": "answer", "budget": answer, "start": n_trace, "end": n_trace + len(ans)}]


def test_models_list_each_budgets_parameter_counts(live, server):
    parent = accounting.count_params(server.parent.config)
    listed = httpx.get(live.url + "/v1/models").json()
    schemas.ModelList.model_validate(listed, strict=True)
    entries = {m["id"]: m for m in listed["data"]}
    for b in server.elastic.ecfg.budgets:
        entry = entries[f"{NAME}@{b:g}"]
        counts = accounting.count_params(server.model(b).config)  # the served view's own config
        assert (entry["total_params"], entry["active_params"]) == (counts.total_params, counts.active_params)
        assert entry["active_params_ratio"] == pytest.approx(counts.active_params / parent.active_params)
        described = server.elastic.describe(b)
        assert (entry["target"], entry["achieved"]) == (b, pytest.approx(described["achieved"]))
        assert entry["budget_type"] == "active_params"
