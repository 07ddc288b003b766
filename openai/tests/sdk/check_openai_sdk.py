"""The official `openai` Python SDK against a tandem OpenAI API, unchanged.

Usage: python3 check_openai_sdk.py BASE_URL API_KEY MODEL
(BASE_URL ends in /v1; the server must require API_KEY). Exits non-zero on failure.
"""

import sys

import openai

base_url, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
question = [{"role": "user", "content": "What is the capital of France?"}]

assert [m.id for m in client.models.list()] == [model]

chat = client.chat.completions.create(
    model=model, messages=question, max_tokens=16, temperature=0
)
text = chat.choices[0].message.content
assert text, chat
assert chat.usage.completion_tokens > 0

chunks = list(
    client.chat.completions.create(
        model=model,
        messages=question,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
)
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert streamed == text, (streamed, text)
assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0, chunks[-1].usage

two = client.chat.completions.create(
    model=model, messages=question, max_tokens=8, n=2, seed=1, logprobs=True, top_logprobs=2
)
assert len(two.choices) == 2
assert len(two.choices[0].logprobs.content[0].top_logprobs) == 2

done = client.completions.create(model=model, prompt="Paris is", max_tokens=8, temperature=0)
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(
        model=model, prompt="Paris is", max_tokens=8, temperature=0, stream=True
    )
    if c.choices
)
assert streamed == done.choices[0].text, (streamed, done.choices[0].text)

for call, error in [
    (lambda: client.chat.completions.create(model="nope", messages=question), openai.NotFoundError),
    (
        lambda: client.chat.completions.create(model=model, messages=question, temperature=5),
        openai.BadRequestError,
    ),
    (
        lambda: openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list(),
        openai.AuthenticationError,
    ),
]:
    try:
        call()
    except error as e:
        assert e.body and e.body.get("message"), e.body
    else:
        raise AssertionError(f"expected {error.__name__}")

print("openai SDK", openai.__version__, "ok")
