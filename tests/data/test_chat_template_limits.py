"""Chat templates that loop, recurse or grow raise one error (issue 13.11).

Each case reproduces a failure found by trying the project with bad input and injected faults,
and checks the behaviour that replaced it. Expected values are written out by hand."""
import os

import pytest

import paths


HF_FIXTURES = os.path.join(paths.HF_FIXTURES, "qwen3_tiny")


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "longer than"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
    ("{{ 'x' * 10**9 }}", "builds a sequence"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}{{ ns.s }}", "builds a sequence"),
    ("{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}", "output exceeds"),
    ("{{ 7 ** 123456789 }}", "power"),
    ("{{ messages[0].content.no_such_method() }}", "failed"),
])
def test_chat_template_that_loops_recurses_or_grows_raises_one_error(tmp_path, template, message):
  import shutil

  from copd_jax.data.chat_template import ChatTemplateError
  from copd_jax.data.hf_tokenizer import HFTokenizer
  directory = tmp_path / "tok"
  shutil.copytree(os.path.join(HF_FIXTURES, "tokenizer"), directory)
  (directory / "chat_template.jinja").write_text(template)
  tok = HFTokenizer(str(directory))
  with pytest.raises(ChatTemplateError, match=message):
    tok.render_chat([{"role": "user", "content": "hi"}])
