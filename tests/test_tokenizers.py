"""`convert`'s tokenizers against llama.cpp's own tokenizer of the same GGUF file (round trips
alone cannot catch a wrong merge): both real families, text with runs of spaces, digits, code
and unicode, and a rendered chat. (Merges ranked by the parts' ids instead of the merged piece's
score fail 3 of these texts on Gemma; without its user-defined space-run tokens, 7.)"""

import pytest
from transformers import AutoTokenizer

from duomem_mlx.convert.fetch import fetch_gguf

CORPUS = [
    "Hello world. The quick brown fox jumps over the lazy dog!",
    "two  spaces,   three,    four,     five,          ten; a\ttab,\t\ttwo tabs",
    "  leading and trailing  ",
    " ",
    "   ",
    "\n",
    "line one\nline two\n\n\nafter three newlines\r\nwindows",
    "12345 678901 3.14159 1,000,000 2026-12-06 0x1F 1e-5 -42 007",
    "def f(x):\n    return x ** 2  # square\n\n\nif __name__ == '__main__':\n\tprint(f(3), [i for i in range(10)])",
    'for (int i = 0; i < n; ++i) { a[i] += b[i] >> 2; }  // C\n<div class="x">&amp;</div>',
    "naïve café — “quotes” ‘single’ … Ångström ß ﬁ",
    "日本語のテキスト、中文文本。한국어 텍스트 Ελληνικά русский текст עברית العربية हिन्दी",
    "emoji 😀👍🏽 and flags 🇫🇷🇯🇵 and zwj 👨‍👩‍👧",
    "a\u00a0b\u200bc\u2028d",
    "x" * 40 + " " * 17 + "y" * 3,
    "ALL CAPS Mixed-Case snake_case camelCase URLs: https://example.com/a?b=c",
    "take the apple from the table, then go north and open the door",
]


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_convert_tokenizes_as_llama_cpp(name, real_models, model_root):
    llama_cpp = pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python is not installed (`pip install llama-cpp-python==0.3.36` "
        "builds llama.cpp from source, ~8 min on 2 cores)",
    )

    reference = llama_cpp.Llama(model_path=str(fetch_gguf(name, root=model_root)), vocab_only=True, verbose=False)
    ours = AutoTokenizer.from_pretrained(str(real_models[name]))
    chat = ours.apply_chat_template(
        [{"role": "user", "content": CORPUS[4]}, {"role": "assistant", "content": CORPUS[-1]}], tokenize=False
    )
    for text in CORPUS + [chat]:
        expected = reference.tokenize(
            text.encode(), add_bos=False, special=True
        )  # control tokens parsed, as in a rendered chat
        assert ours.encode(text, add_special_tokens=False) == expected, text
        assert ours.decode(expected) == text, text
