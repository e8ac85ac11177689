"""Other clients people point at the server: LangChain's ChatOpenAI (invoke, stream, bind_tools).
(schemathesis fuzzes the OpenAPI document in tests/test_api_hostile.py.)"""

import json

import pytest

from conftest import TINY
from server_helpers import running_server

SCRIPT = {"查股票": 'track\n ```python\ntool_call(symbol="10111")\n```'}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    f = tmp_path_factory.mktemp("script") / "script.json"
    f.write_text(json.dumps(SCRIPT, ensure_ascii=False))
    with running_server("--model", str(TINY), "--dtype", "float32", "--scripted-replies", str(f),
                        "--max-tokens", "64") as (url, _):
        yield url


def test_langchain_invoke_stream_and_bind_tools(base):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=base + "/v1", api_key="x", model="default", temperature=0, max_tokens=16, max_retries=0)
    answer = llm.invoke("你好")
    assert isinstance(answer.content, str) and answer.content
    streamed = "".join(chunk.content for chunk in llm.stream("你好"))
    assert streamed == answer.content

    @tool
    def track(symbol: str) -> str:
        """追踪指定股票的实时价格"""
        return "12412"

    tool_llm = ChatOpenAI(base_url=base + "/v1", api_key="x", model="default", temperature=0, max_tokens=64,
                          max_retries=0)
    msg = tool_llm.bind_tools([track]).invoke("查股票")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "track"
    assert msg.tool_calls[0]["args"] == {"symbol": "10111"}
