#!/usr/bin/env python3
"""Talks to a running deltaserve server with OpenAI's official Python client (pip install openai).

Usage: openai_client.py BASE_URL API_KEY BASE_MODEL TENANT
  BASE_URL like http://127.0.0.1:8000/v1. Exits non-zero on the first failed check.
The Rust test `openai_python_client` (tests/clients.rs) starts a server and runs this.
"""
import sys

import openai


def main():
    base_url, key, base, tenant = sys.argv[1:5]
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
    checks = 0

    models = {m.id: m for m in client.models.list()}
    assert base in models and tenant in models, list(models)
    assert getattr(models[tenant], "parent", None) == base, models[tenant]
    checks += 1

    for model in (base, tenant):
        whole = client.completions.create(model=model, prompt="def main():", max_tokens=8, temperature=0)
        text = whole.choices[0].text
        assert whole.choices[0].finish_reason in ("stop", "length"), whole
        assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens >= 1, whole.usage
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(
                model=model, prompt="def main():", max_tokens=8, temperature=0, stream=True
            )
            if c.choices
        )
        assert streamed == text, (streamed, text)
        checks += 2

        messages = [{"role": "user", "content": "Say hello"}]
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        reply = chat.choices[0].message.content
        assert chat.choices[0].message.role == "assistant"
        parts, usage = [], None
        for chunk in client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                parts.append(c.delta.content or "")
        assert "".join(parts) == reply, (parts, reply)
        assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage
        checks += 2

    # Sampling with a seed is reproducible.
    a = client.completions.create(model=tenant, prompt="x", max_tokens=6, temperature=0.9, top_p=0.9, seed=11)
    b = client.completions.create(model=tenant, prompt="x", max_tokens=6, temperature=0.9, top_p=0.9, seed=11)
    assert a.choices[0].text == b.choices[0].text
    checks += 1

    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
        raise AssertionError("unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404
    try:
        client.completions.create(model=base, prompt="x", max_tokens=2, n=2)
        raise AssertionError("n=2 was accepted")
    except openai.BadRequestError as e:
        assert "`n`" in str(e), str(e)
    try:
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401
    checks += 3

    print(f"openai {openai.__version__}: {checks} checks passed")


if __name__ == "__main__":
    main()
