"""RULER-style synthetic long-context tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?", arXiv 2404.06654), generated from the shared real texts, and their scoring.

The task definitions, prompt templates, answer prefixes, generation budgets and the string-match score follow the
paper and its public task generators (NVIDIA/RULER, ``scripts/data/synthetic`` and ``scripts/synthetic.yaml``):

- ``niah``: needles "One of the special magic {kind} for {key} is: {value}." hidden in a haystack; the question asks
  for every value of the queried key(s). Haystacks: ``essay`` (real text: RULER uses Paul Graham's essays, here one of
  the shared long texts, cut at sentence boundaries), ``noise`` (RULER's repeated "The grass is green. ..."), or
  ``needle`` (distractor needles of random keys, RULER's multikey_2/3). Keys and values are ``numbers`` (7 digits),
  ``words`` (two real words joined by a hyphen, like RULER's adjective-noun pairs) or ``uuids``. Several keys
  (distractors), several values per key (multivalue) or several queried keys (multiquery).
- ``variable_tracking``: chains "VAR X = 12345", "VAR Y = VAR X", ... (num_hops assignments) hidden in the noise
  haystack; the answer is every variable of the chain. One short solved example comes first, as in RULER.
- ``common_words_extraction``: a numbered list of real words where 10 words repeat often (30 times, 3 for the others;
  6 and 1 below 4K tokens) and the answer is those 10 words; one short solved example comes first.
- ``freq_words_extraction``: coded 6-letter words drawn from a Zipf law (alpha 2); the answer is the 3 most frequent
  (the most frequent, written '...', is noise and excluded).

Each prompt holds at most ``length - tokens_to_generate`` tokens (RULER's budget: prompt plus generation fit the
length), found by binary search on the haystack size with the model's tokenizer, chat template included. Every
sample is a pure function of (seed, task, length, sample index). Scoring is in :mod:`.ruler_scoring`, running in
:mod:`.ruler`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import string
import uuid
from collections import Counter
from typing import Any

from .util import describe

# ----------------------------------------------------------------------------------------------------------------
# Templates (RULER scripts/data/synthetic/constants.py)
# ----------------------------------------------------------------------------------------------------------------
#: Per task kind: the prompt template ({context}, {query} and kind-specific fields), the answer prefix appended after
#: the model's turn starts, and RULER's generation budget in tokens.
KINDS: dict[str, dict[str, Any]] = {
    "niah": {
        "template": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                    "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                    "magic {type_needle_v} for {query} mentioned in the provided text?",
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
        "tokens_to_generate": 128,
    },
    "variable_tracking": {
        "template": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                         "variables are assigned the value {query}, they are: ",
        "tokens_to_generate": 30,
    },
    "common_words_extraction": {
        "template": "Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                    "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                    "above list?",
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
        "tokens_to_generate": 120,
    },
    "freq_words_extraction": {
        "template": "Read the following coded text and track the frequency of each coded word. Find the three most "
                    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                    "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
                    "text?",
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
        "tokens_to_generate": 50,
    },
}

#: The noise haystack sentence of RULER's niah and variable-tracking tasks.
NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#: The needle sentence of the niah tasks.
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
#: Needle depths (percent of the haystack's sentences before the needle), as in RULER: 40 evenly spaced, 0..100.
DEPTHS = [round(100 * i / 39) for i in range(40)]
#: Digits of a "numbers" needle value (RULER: 7).
NUMBER_DIGITS = 7
#: Letters of a variable name (RULER: 5) and digits of the tracked value (RULER: 10000-99999).
VAR_LETTERS, VAR_VALUE_RANGE = 5, (10000, 99999)
#: cwe: common words (RULER's num_cw), and below RULER's 4096-token switch, (common, uncommon) repeats of the list
#: and of its solved example; at or above it the config's freq_cw / freq_ucw apply and the example uses 10 / 3.
CWE_SHORT_LENGTH = 4096
CWE_SHORT_REPEATS, CWE_SHORT_EXAMPLE = (6, 1), (20, 3, 1)
CWE_LONG_EXAMPLE = (40, 10, 3)
#: fwe: coded word length, vocabulary size and answers (RULER: 6, 2000, the 3 most frequent after the noise word).
FWE_WORD_LEN, FWE_VOCAB, FWE_ANSWERS = 6, 2000, 3
#: vt: the solved example's noise sentences (RULER builds it at a 500-token budget; a handful of sentences).
VT_EXAMPLE_NOISE = 5
#: Real words for keys, values and the cwe list: lowercase letters only, this many letters, seen this often.
WORD_LETTERS, WORD_MIN_COUNT = (4, 10), 3
#: The least material accepted: haystack words and distinct vocabulary words.
MIN_HAYSTACK_WORDS, MIN_VOCABULARY = 1000, 100

#: The standard RULER synthetic suite (scripts/synthetic.yaml, without the two QA tasks, which need SQuAD/HotpotQA)
#: plus one single needle with a word value. Per task: its kind and arguments.
STANDARD_TASKS: dict[str, dict[str, Any]] = {
    "niah_single_1": {"kind": "niah", "type_haystack": "noise", "type_needle_k": "words", "type_needle_v": "numbers"},
    "niah_single_2": {"kind": "niah", "type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers"},
    "niah_single_3": {"kind": "niah", "type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "uuids"},
    "niah_single_word": {"kind": "niah", "type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "words"},
    "niah_multikey_1": {"kind": "niah", "type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers",
                        "num_needle_k": 4},
    "niah_multikey_2": {"kind": "niah", "type_haystack": "needle", "type_needle_k": "words",
                        "type_needle_v": "numbers"},
    "niah_multikey_3": {"kind": "niah", "type_haystack": "needle", "type_needle_k": "uuids", "type_needle_v": "uuids"},
    "niah_multivalue": {"kind": "niah", "type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers",
                        "num_needle_v": 4},
    "niah_multiquery": {"kind": "niah", "type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers",
                        "num_needle_q": 4},
    "vt": {"kind": "variable_tracking", "num_chains": 1, "num_hops": 4},
    "cwe": {"kind": "common_words_extraction", "freq_cw": 30, "freq_ucw": 3, "num_cw": 10},
    "fwe": {"kind": "freq_words_extraction", "alpha": 2.0},
}

_NIAH_DEFAULTS = {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers", "num_needle_k": 1,
                  "num_needle_v": 1, "num_needle_q": 1}
_KIND_DEFAULTS = {
    "niah": _NIAH_DEFAULTS,
    "variable_tracking": {"num_chains": 1, "num_hops": 4},
    "common_words_extraction": {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10},
    "freq_words_extraction": {"alpha": 2.0},
}
_HAYSTACKS = ("essay", "noise", "needle")
_NEEDLE_TYPES = ("numbers", "words", "uuids")

# ----------------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RulerTask:
    """One task of the suite: a `name`, its `kind` (a key of `KINDS`) and the kind's arguments (`args`)."""

    name: str
    kind: str
    args: dict

    @classmethod
    def from_config(cls, name: str, entry: dict) -> RulerTask:
        """A task from a config entry ``{kind: ..., <argument>: ...}``; missing arguments take RULER's defaults."""
        if not isinstance(entry, dict) or "kind" not in entry:
            raise ValueError(f"ruler.tasks.{name} must be a mapping with a 'kind' key, got {describe(entry)}")
        kind = entry["kind"]
        if kind not in KINDS:
            raise ValueError(f"ruler.tasks.{name}.kind must be one of {sorted(KINDS)}, got {kind!r}")
        args = {k: v for k, v in entry.items() if k != "kind"}
        defaults = _KIND_DEFAULTS[kind]
        unknown = sorted(set(args) - set(defaults))
        if unknown:
            raise ValueError(f"ruler.tasks.{name} arguments must be among {sorted(defaults)} for kind {kind!r}, got "
                             f"{unknown}")
        args = {**defaults, **args}
        for key, value in args.items():
            if key.startswith("type_"):
                allowed = _HAYSTACKS if key == "type_haystack" else _NEEDLE_TYPES
                if value not in allowed:
                    raise ValueError(f"ruler.tasks.{name}.{key} must be one of {allowed}, got {value!r}")
            elif key == "alpha":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 1:
                    raise ValueError(f"ruler.tasks.{name}.alpha must be a number > 1, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ruler.tasks.{name}.{key} must be a positive integer, got {value!r}")
        return cls(name, kind, args)

    @property
    def tokens_to_generate(self) -> int:
        return KINDS[self.kind]["tokens_to_generate"]


@dataclasses.dataclass
class Sample:
    """One prompt: the task text (template with the context), the answer prefix, and the expected values."""

    task: str
    length: int
    index: int
    text: str
    answer_prefix: str
    references: list[str]
    prompt_tokens: int = 0


class Sources:
    """The real material of the suite: the essay haystack's words (whitespace-separated, in order) and a real-word
    vocabulary."""

    def __init__(self, haystack_text: str, words_text: str):
        self.haystack = haystack_text.split()
        counts = Counter(re.findall(r"(?<![A-Za-z])[a-z]+(?![A-Za-z])", words_text))  # whole lowercase words
        lo, hi = WORD_LETTERS
        self.words = sorted(w for w, c in counts.items() if lo <= len(w) <= hi and c >= WORD_MIN_COUNT)
        if len(self.haystack) < MIN_HAYSTACK_WORDS or len(self.words) < MIN_VOCABULARY:
            raise ValueError(f"ruler texts must give a haystack of at least {MIN_HAYSTACK_WORDS} words and "
                             f"{MIN_VOCABULARY} distinct words, got {len(self.haystack)} and {len(self.words)}")


def _random_value(rng: random.Random, kind: str, sources: Sources) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** (NUMBER_DIGITS - 1), 10 ** NUMBER_DIGITS - 1))
    if kind == "words":
        return f"{rng.choice(sources.words)}-{rng.choice(sources.words)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _essay(rng: random.Random, sources: Sources, n_words: int) -> list[str]:
    """`n_words` consecutive words of the real text from a random start (wrapping around), cut into sentences."""
    words = sources.haystack
    start = rng.randrange(len(words))
    text = " ".join(words[(start + i) % len(words)] for i in range(n_words))
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def _insert_at_depths(rng: random.Random, sentences: list[str], inserts: list[str]) -> str:
    """`inserts` placed between `sentences` at depths sampled (without replacement) from `DEPTHS`, joined by spaces."""
    positions = sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(inserts)))
    out, last = [], 0
    for pos, item in zip(positions, inserts):
        out.extend(sentences[last:pos])
        out.append(item)
        last = pos
    out.extend(sentences[last:])
    return " ".join(out)


def _insert_lines(rng: random.Random, lines: list[str], inserts: list[str]) -> str:
    """`inserts` (in order) at random line positions among `lines`, joined by newlines."""
    lines = list(lines)
    for index, item in zip(sorted(rng.sample(range(len(lines) + 1), len(inserts)), reverse=True), reversed(inserts)):
        lines.insert(index, item)
    return "\n".join(lines)


def _niah(rng: random.Random, args: dict, sources: Sources, size: int) -> tuple[str, str, list[str]]:
    num_k = max(args["num_needle_k"], args["num_needle_q"])
    kind_v = args["type_needle_v"]
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random_value(rng, args["type_needle_k"], sources))
        values.append([_random_value(rng, kind_v, sources) for _ in range(args["num_needle_v"])])
        needles += [NEEDLE.format(type_needle_v=kind_v, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    if args["type_haystack"] == "essay":
        context = _insert_at_depths(rng, _essay(rng, sources, size), needles)
    elif args["type_haystack"] == "noise":
        context = _insert_lines(rng, [NOISE_SENTENCE] * size, needles)
    else:
        distractors = [NEEDLE.format(type_needle_v=kind_v, key=_random_value(rng, args["type_needle_k"], sources),
                                     value=_random_value(rng, kind_v, sources)) for _ in range(size)]
        context = _insert_lines(rng, distractors, needles)
    picked = rng.sample(range(num_k), args["num_needle_q"])
    queries = [keys[i] for i in picked]
    answers = [v for i in picked for v in values[i]]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    template, prefix = KINDS["niah"]["template"], KINDS["niah"]["answer_prefix"]
    if args["num_needle_q"] * args["num_needle_v"] == 1:  # RULER's singular wording
        template, prefix = (s.replace("Some", "A").replace("are all", "is").replace("are", "is")
                            for s in (template, prefix))
        kind_v = kind_v[:-1]
    fields = {"type_needle_v": kind_v, "query": query}
    return template.format(context=context, **fields), prefix.format(**fields), answers


def _vt_chain(rng: random.Random, num_chains: int, num_hops: int) -> tuple[list[list[str]], list[list[str]]]:
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=VAR_LETTERS))
        if name not in names:
            names.append(name)
    chains, variables = [], []
    for c in range(num_chains):
        var = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        chain = [f"VAR {var[0]} = {rng.randint(*VAR_VALUE_RANGE)}"]
        chain += [f"VAR {var[j + 1]} = VAR {var[j]} " for j in range(num_hops)]
        chains.append(chain)
        variables.append(var)
    return variables, chains


def _vt_text(rng: random.Random, args: dict, size: int) -> tuple[str, str, list[str]]:
    variables, chains = _vt_chain(rng, args["num_chains"], args["num_hops"])
    lines = [NOISE_SENTENCE] * max(size, args["num_hops"] + 1)  # room for a chain's lines at distinct positions
    for chain in chains:
        positions = sorted(rng.sample(range(len(lines)), len(chain)))
        for j, (pos, item) in enumerate(zip(positions, chain)):
            lines.insert(pos + j, item)
    value = chains[0][0].split("=")[-1].strip()
    fields = {"query": value, "num_v": args["num_hops"] + 1}
    kind = KINDS["variable_tracking"]
    context = "\n".join(lines).replace(". \n", ".\n")
    return kind["template"].format(context=context, **fields), kind["answer_prefix"].format(**fields), variables[0]


def _variable_tracking(rng: random.Random, args: dict, sources: Sources, size: int) -> tuple[str, str, list[str]]:
    example, example_prefix, example_answer = _vt_text(rng, args, VT_EXAMPLE_NOISE)
    text, prefix, answer = _vt_text(rng, args, size)
    solved = example + example_prefix + " ".join(example_answer)
    return solved + "\n\n" + text, prefix, answer


def _cwe_list(rng: random.Random, sources: Sources, num_words: int, common: int, uncommon: int,
              num_cw: int) -> tuple[str, list[str]]:
    if num_words > len(sources.words):
        raise ValueError(f"ruler cwe needs {num_words} distinct words, the words text has {len(sources.words)}")
    chosen = rng.sample(sources.words, num_words)
    top, rest = chosen[:num_cw], chosen[num_cw:]
    items = top * common + rest * uncommon
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), top


def _common_words(rng: random.Random, args: dict, sources: Sources, size: int,
                  length: int) -> tuple[str, str, list[str]]:
    kind, num_cw = KINDS["common_words_extraction"], args["num_cw"]
    if length < CWE_SHORT_LENGTH:
        (ex_n, ex_c, ex_u), (common, uncommon) = CWE_SHORT_EXAMPLE, CWE_SHORT_REPEATS
    else:
        (ex_n, ex_c, ex_u), (common, uncommon) = CWE_LONG_EXAMPLE, (args["freq_cw"], args["freq_ucw"])
    ex_context, ex_answer = _cwe_list(rng, sources, max(ex_n, num_cw + 1), ex_c, ex_u, num_cw)
    context, answer = _cwe_list(rng, sources, num_cw + size, common, uncommon, num_cw)
    solved = (kind["template"].format(context=ex_context, query="") + kind["answer_prefix"] + " "
              + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer)))
    return solved + "\n" + kind["template"].format(context=context, query=""), kind["answer_prefix"], answer


def zeta(alpha: float, terms: int = 10000) -> float:
    """Riemann zeta(alpha) for alpha > 1: the first `terms` terms plus the Euler-Maclaurin tail."""
    head = math.fsum(k ** -alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + 0.5 * terms ** -alpha


def _freq_words(rng: random.Random, args: dict, sources: Sources, size: int) -> tuple[str, str, list[str]]:
    vocab: set[str] = set()
    while len(vocab) < FWE_VOCAB:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LEN)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."  # the most frequent "word" is noise
    z = zeta(args["alpha"])
    items = [w for k, w in enumerate(words, start=1) for _ in range(int(size * k ** -args["alpha"] / z))]
    rng.shuffle(items)
    kind = KINDS["freq_words_extraction"]
    return kind["template"].format(context=" ".join(items), query=""), kind["answer_prefix"], words[1:1 + FWE_ANSWERS]


def build_text(task: RulerTask, sources: Sources, size: int, length: int, seed: str) -> tuple[str, str, list[str]]:
    """(task text, answer prefix, expected values) of `task` with a haystack of `size` units (essay words, lines, list
    words or coded words), from a generator seeded by `seed` (the same seed and size give the same text)."""
    rng = random.Random(seed)
    if task.kind == "niah":
        return _niah(rng, task.args, sources, size)
    if task.kind == "variable_tracking":
        return _variable_tracking(rng, task.args, sources, size)
    if task.kind == "common_words_extraction":
        return _common_words(rng, task.args, sources, size, length)
    return _freq_words(rng, task.args, sources, size)


#: Haystack units (essay words, noise or needle lines, list words, coded words) of the first binary-search bracket,
#: doubled until the prompt no longer fits.
START_SIZE = 16


class PromptFormat:
    """The prompt around a task text: the tokenizer's chat template (user turn = task text; the assistant turn starts
    with the answer prefix, as RULER does for chat models) or the plain text followed by the answer prefix."""

    def __init__(self, tokenizer, template: str):
        allowed = ("auto", "chat", "plain")
        if template not in allowed:
            raise ValueError(f"ruler.template must be one of {allowed}, got {template!r}")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise ValueError("ruler.template is 'chat' but the tokenizer has no chat template (use 'plain' or 'auto')")
        self.tokenizer = tokenizer
        self.chat = has_chat if template == "auto" else template == "chat"

    def __call__(self, text: str, answer_prefix: str) -> str:
        if not self.chat:
            return text + answer_prefix
        head = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)
        return head + answer_prefix.lstrip()

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a formatted prompt (the tokenizer's special tokens added for plain prompts, e.g. a BOS; the
        chat template already holds its own)."""
        return self.tokenizer(prompt, add_special_tokens=not self.chat)["input_ids"]

    def count(self, prompt: str) -> int:
        return len(self.encode(prompt))


#: Shrink step of the haystack when a further sample of a task no longer fits at the first sample's size.
SHRINK = 0.97


def make_samples(task: RulerTask, sources: Sources, fmt: PromptFormat, length: int, num_samples: int, seed: int,
                 tokens_to_generate: int) -> list[Sample]:
    """`num_samples` samples of `task` at `length` tokens, each from the seed (seed, task, length, index).

    As in RULER, the haystack size is found once (sample 0: the largest whose prompt holds at most
    ``length - tokens_to_generate`` tokens, by doubling then bisection) and the further samples start from it,
    shrinking by `SHRINK` until their prompt fits.
    """
    budget = length - tokens_to_generate

    def build(size: int, index: int) -> tuple[bool, Sample]:
        text, prefix, refs = build_text(task, sources, size, length, f"{seed}:{task.name}:{length}:{index}")
        n = fmt.count(fmt(text, prefix))
        return n <= budget, Sample(task.name, length, index, text, prefix, refs, n)

    lo = 1
    ok, best = build(lo, 0)
    if not ok:
        raise ValueError(f"ruler lengths must leave room for the {task.name} prompt: {length} tokens (with "
                         f"{tokens_to_generate} to generate) is too short ({best.prompt_tokens} prompt tokens at the "
                         f"smallest haystack)")
    hi = START_SIZE
    while True:  # grow until the prompt no longer fits
        ok, sample = build(hi, 0)
        if not ok:
            break
        lo, best, hi = hi, sample, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, sample = build(mid, 0)
        if ok:
            lo, best = mid, sample
        else:
            hi = mid
    out = [best]
    for index in range(1, num_samples):
        size = lo
        ok, sample = build(size, index)
        while not ok and size > 1:
            size = max(1, int(size * SHRINK))
            ok, sample = build(size, index)
        out.append(sample)
    return out


def tasks_from_config(rcfg: dict) -> list[RulerTask]:
    """The tasks of a ``ruler`` config section (``tasks``: a mapping of name to ``{kind, arguments}``; ``only``:
    names to keep, or null for all)."""
    tasks = rcfg["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"ruler.tasks must be a non-empty mapping of task names to settings, got {describe(tasks)}")
    out = [RulerTask.from_config(name, entry) for name, entry in tasks.items()]
    only = rcfg.get("only")
    if only is not None:
        if not isinstance(only, list) or not only:
            raise ValueError(f"ruler.only must be a non-empty list of task names or null, got {only!r}")
        unknown = [n for n in only if n not in tasks]
        if unknown:
            raise ValueError(f"ruler.only must name tasks of ruler.tasks {sorted(tasks)}, got {unknown}")
        out = [t for t in out if t.name in only]
    return out


def generation_budget(task: RulerTask, rcfg: dict) -> int:
    """Tokens generated for `task`: ``ruler.max_new_tokens[kind]`` if set, else RULER's budget for its kind."""
    override = (rcfg.get("max_new_tokens") or {}).get(task.kind)
    return task.tokens_to_generate if override is None else override
