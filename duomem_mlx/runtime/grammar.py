"""Function calls as a character grammar, for constrained decoding.

A call's grammar is built from the offered tools' JSON schemas: the name is one of the tools,
the arguments follow the tool's properties in their declared order (required ones always,
optional ones or not), each value of its type: an enum's values, an integer, a number, a
boolean, a string (free text, escapes as the format writes them), an array of its items, or
any literal. Two spellings: JSON (`{"name": "f", "arguments": {"a": 1}}` inside the family's
own wrapper, as its chat template renders a call) and Python (`f(a=1)`, the prompt format).

The grammar is an NFA over characters; a set of its nodes is a state of the equivalent DFA,
and `TokenIndex` memoizes for each state the tokens whose text keeps the output inside the
grammar (outlines' idea: the vocabulary is walked once per state, as a character trie)."""

import functools
import json
from collections import deque

from duomem_mlx.runtime.prompt import encode


class Grammar:
    """An NFA built in continuation-passing style: each builder takes the node to go on to
    and returns its own start node, so shared continuations are built once."""

    def __init__(self):
        self.edges: list[list[tuple]] = []  # node -> [(test(char) -> bool, example char, next node)]
        self.eps: list[list[int]] = []  # node -> nodes reached without a character
        self.steps: dict[tuple, frozenset | None] = {}  # (state, char) -> state: the DFA, as far as walked
        self.accept = self.node()

    def node(self) -> int:
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def lit(self, text: str, then: int) -> int:
        for ch in reversed(text):
            then = self.char(lambda c, ch=ch: c == ch, ch, then)
        return then

    def char(self, test, example: str, then: int) -> int:
        start = self.node()
        self.edges[start].append((test, example, then))
        return start

    def alt(self, *starts: int) -> int:
        start = self.node()
        self.eps[start].extend(starts)
        return start

    def star(self, test, example: str, then: int) -> int:
        """Zero or more characters passing `test`, then `then`."""
        loop = self.node()
        self.edges[loop].append((test, example, loop))
        self.eps[loop].append(then)
        return loop

    def plus(self, test, example: str, then: int) -> int:
        return self.char(test, example, self.star(test, example, then))

    def closure(self, nodes) -> frozenset:
        seen, todo = set(nodes), list(nodes)
        while todo:
            for n in self.eps[todo.pop()]:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return frozenset(seen)

    def step(self, state: frozenset, ch: str) -> frozenset | None:
        key = (state, ch)
        if key not in self.steps:
            reached = [to for n in state for test, _, to in self.edges[n] if test(ch)]
            self.steps[key] = self.closure(reached) if reached else None
        return self.steps[key]

    def accepts(self, state: frozenset) -> bool:
        return self.accept in state

    def matches(self, start: frozenset, text: str) -> bool:
        state = start
        for ch in text:
            state = self.step(state, ch)
            if state is None:
                return False
        return self.accepts(state)

    def shortest_completion(self, state: frozenset) -> str:
        """The shortest text that takes `state` to acceptance (for a reply cut off by its token budget)."""
        seen, todo = {state}, deque([(state, "")])
        while todo:
            state, text = todo.popleft()
            if self.accepts(state):
                return text
            for example in {e for n in state for _, e, _ in self.edges[n]}:
                nxt = self.step(state, example)
                if nxt is not None and nxt not in seen:
                    seen.add(nxt)
                    todo.append((nxt, text + example))
        return ""


def digit(c):
    return c.isdigit() and c.isascii()


def printable(c):
    """A character of a text reply's first words: printable, no space."""
    return c.isprintable() and not c.isspace()


def word_char(c):
    """A character Python reads as part of a name (letters, digits, `_`, combining marks)."""
    return ("a" + c).isidentifier()


class Spelling:
    """How a call and its literals are written: `json` or `python`."""

    def __init__(self, kind: str):
        self.kind = kind
        self.true, self.false, self.null = ("true", "false", "null") if kind == "json" else ("True", "False", "None")

    def literal(self, value) -> str:
        return json.dumps(value) if self.kind == "json" else repr(value)

    def string(self, g: Grammar, then: int) -> int:
        """A quoted string; JSON's escapes, or Python's simple ones in either quote."""
        quotes = ['"'] if self.kind == "json" else ["'", '"']
        escapes = '"\\/bfnrt' if self.kind == "json" else "\\'\"nt"
        starts = []
        for q in quotes:
            body = g.node()
            close = g.lit(q, then)
            plain = g.char(lambda c, q=q: c != q and c != "\\" and c >= " " and c != "\x7f", "a", body)
            escape = g.lit("\\", g.char(lambda c: c in escapes, escapes[0], body))
            g.eps[body].extend([close, plain, escape])
            starts.append(g.lit(q, body))
        return g.alt(*starts)

    def integer(self, g: Grammar, then: int) -> int:
        digits = g.alt(g.lit("0", then), g.char(lambda c: digit(c) and c != "0", "1", g.star(digit, "0", then)))
        return g.alt(digits, g.lit("-", digits))

    def number(self, g: Grammar, then: int) -> int:
        fraction = g.alt(then, g.lit(".", g.plus(digit, "0", then)))
        return self.integer(g, fraction)

    def value(self, g: Grammar, schema: dict, then: int, depth: int = 2) -> int:
        kind = schema.get("type")
        if "enum" in schema:
            return g.alt(*(g.lit(self.literal(v), then) for v in schema["enum"]))
        if kind == "integer":
            return self.integer(g, then)
        if kind in ("number", "float"):
            return self.number(g, then)
        if kind == "boolean":
            return g.alt(g.lit(self.true, then), g.lit(self.false, then))
        if kind == "string":
            return self.string(g, then)
        if kind in ("array", "tuple") and depth > 0:
            return self.sequence(g, schema.get("items", {}), then, depth - 1)
        if kind in ("object", "dict") and depth > 0:
            return self.mapping(g, then, depth - 1)
        return self.any(g, then, depth)

    def any(self, g: Grammar, then: int, depth: int) -> int:
        scalars = [
            self.string(g, then),
            self.number(g, then),
            g.lit(self.true, then),
            g.lit(self.false, then),
            g.lit(self.null, then),
        ]
        if depth > 0:
            scalars += [self.sequence(g, {}, then, depth - 1), self.mapping(g, then, depth - 1)]
        return g.alt(*scalars)

    def sequence(self, g: Grammar, items: dict, then: int, depth: int) -> int:
        close = g.lit("]", then)
        more = g.node()
        item = self.value(g, items, more, depth)
        g.eps[more].extend([close, g.lit(", ", item)])
        return g.lit("[", g.alt(close, item))

    def mapping(self, g: Grammar, then: int, depth: int) -> int:
        close = g.lit("}", then)
        more = g.node()
        entry = self.string(g, g.lit(": ", self.any(g, more, depth)))
        g.eps[more].extend([close, g.lit(", ", entry)])
        return g.lit("{", g.alt(close, entry))

    def arguments(self, g: Grammar, parameters: dict, then: int) -> int:
        """The arguments in declared order, required ones always, each optional one or not;
        JSON as an object, Python as keywords."""
        names = list(parameters.get("properties", {}))
        required = set(parameters.get("required", []))
        props = parameters.get("properties", {})
        key = (lambda n: f"{json.dumps(n)}: ") if self.kind == "json" else (lambda n: f"{n}=")

        @functools.cache
        def rest(i: int, first: bool) -> int:
            if i == len(names):
                return then
            present = g.lit(("" if first else ", ") + key(names[i]), self.value(g, props[names[i]], rest(i + 1, False)))
            return present if names[i] in required else g.alt(present, rest(i + 1, first))

        return rest(0, True)


def call_grammar(
    tools: list[dict], spelling: Spelling, wrap: tuple[str, str, str] = ("", "", ""), text_replies: bool = False
) -> tuple[Grammar, frozenset]:
    """(grammar, start state) of one call of the tools; `wrap` is the family's (before the
    name, between name and arguments, after the arguments) for JSON calls. With
    `text_replies`, a line of text that is no call is also accepted."""
    g = Grammar()
    if spelling.kind == "json":
        before, between, after = wrap
        end = g.lit(after, g.accept)
        starts = [
            g.lit(
                before + tool["name"] + between + "{",
                spelling.arguments(g, tool.get("parameters", {}), g.lit("}", end)),
            )
            for tool in tools
        ]
    else:
        starts = [
            g.lit(tool["name"] + "(", spelling.arguments(g, tool.get("parameters", {}), g.lit(")", g.accept)))
            for tool in tools
        ]
    if text_replies:
        starts.append(text_reply(g))
    return g, g.closure([g.alt(*starts)])


def text_reply(g: Grammar) -> int:
    """A line of text that `parse_call` reads as no call: it starts with neither a name
    followed by `(` nor `{`, `[`, `<`, a fence or a space (a word then `.`, `,`, `!`, or a space and no `(`).
    A newline ends it, as it ends a free-decoded action."""
    rest = g.star(str.isprintable, "a", g.alt(g.accept, g.lit("\n", g.accept)))
    after_word = g.alt(
        g.accept,
        g.char(lambda c: not word_char(c) and c != "(" and printable(c), ".", rest),
        g.lit(" ", g.char(lambda c: c != "(" and printable(c), "a", rest)),
    )
    word = g.plus(word_char, "a", after_word)
    other = g.char(lambda c: not word_char(c) and c not in "{`([<" and printable(c), ".", rest)
    return g.alt(word, other)


@functools.lru_cache(maxsize=2)
def token_texts(tokenizer) -> tuple:
    """Each token id's text as it reads inside a reply (after another token: SentencePiece's
    leading space kept), None for special tokens and pieces of a UTF-8 character."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    size = max(tokenizer.get_vocab().values()) + 1
    anchor = encode(tokenizer, "a")[-1]
    base = hf.decode([anchor])
    special = set(getattr(hf, "all_special_ids", [])) | {
        i for i, t in getattr(hf, "added_tokens_decoder", {}).items() if t.special
    }
    texts = hf.batch_decode([[anchor, i] for i in range(size)])
    return tuple(
        None if i in special or "\ufffd" in t or not t.startswith(base) or t == base else t[len(base) :]
        for i, t in enumerate(texts)
    )


@functools.lru_cache(maxsize=2)
def char_trie(tokenizer) -> dict:
    """The vocabulary as a character trie: node -> {char: node}, a token's id under key None."""
    root: dict = {}
    for i, text in enumerate(token_texts(tokenizer)):
        if text:
            node = root
            for ch in text:
                node = node.setdefault(ch, {})
            node.setdefault(None, []).append(i)
    return root


class TokenIndex:
    """Per DFA state, the tokens that keep the output in the grammar and the state after each."""

    def __init__(self, grammar: Grammar, tokenizer):
        self.grammar, self.trie, self.texts = grammar, char_trie(tokenizer), token_texts(tokenizer)
        self.allowed: dict[frozenset, dict[int, frozenset]] = {}
        self.sorted: dict[frozenset, list[int]] = {}

    def __call__(self, state: frozenset) -> dict[int, frozenset]:
        if state not in self.allowed:
            self.allowed[state] = self.walk(state)
        return self.allowed[state]

    def candidates(self, state: frozenset, eot: int) -> list[int]:
        """The tokens `state` allows in id order, the end of turn `eot` among them once the text
        is complete (a string state allows most of the vocabulary: sorted once, not per token)."""
        if state not in self.sorted:
            allowed = self(state)
            self.sorted[state] = sorted([*allowed, eot] if self.grammar.accepts(state) else allowed)
        return self.sorted[state]

    def walk(self, state: frozenset) -> dict[int, frozenset]:
        out: dict[int, frozenset] = {}
        todo = [(self.trie, state)]
        step = self.grammar.step
        while todo:
            node, at = todo.pop()
            for ch, child in node.items():
                if ch is None:
                    out.update((i, at) for i in child)
                elif (nxt := step(at, ch)) is not None:
                    todo.append((child, nxt))
        return out
