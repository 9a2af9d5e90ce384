"""Deterministic synthetic "world" for the built-in demo (``offsite demo``).

Everything here is generated from a seed with :class:`random.Random`; there is no ML
code and nothing is downloaded.  The demo model owner pretrains a small LLaMA-style
causal LM on :func:`pretraining_corpus`, so the facts of the world end up stored in the
model's weights.  The data owner's private downstream task (:func:`downstream_task`)
asks about those facts in a *new* question format that never occurs in pretraining:

* full model zero-shot is poor (the format is unknown),
* fine-tuning the adapter blocks teaches the format, and the full model still holds
  the facts, so plug-in does well,
* the emulator (middle blocks compressed, and, if distilled, distilled only on
  fact-free public text from :func:`distillation_corpus`) has lost much of the
  knowledge, so the emulator fine-tuned stays clearly below plug-in.

Held-out evaluation questions are about *entities that never appear in the fine-tuning
set*, so fine-tuning cannot memorise answers; it has to use the facts stored in the model.

Pretraining text, e.g.::

    the color of zorbek is teal . a small dog runs near the old river . kavu 's food is rice .

Downstream record (completion-only loss)::

    {"prompt": "Q : zorbek ? color => A :", "completion": " teal"}

Held-out multiple-choice record (lm-eval style, choices are scored after ``question``)::

    {"question": "Q : kavu ? food => A :", "choices": [" rice", " corn", " fig", " plum"], "answer": 0}
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokenizers import Tokenizer, models, pre_tokenizers, processors

__all__ = [
    "ATTRIBUTES",
    "SPECIAL_TOKENS",
    "World",
    "build_tokenizer",
    "build_world",
    "distillation_corpus",
    "downstream_task",
    "pretraining_corpus",
    "render_question",
    "validation_split",
]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)

#: attribute name -> its possible values (each value is one word).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "teal", "gray", "pink", "gold", "black"),
    "food": ("rice", "corn", "fig", "plum", "bread", "fish", "beans", "honey"),
    "home": ("lorn", "vesk", "tamar", "quill", "odra", "brisk", "selm", "haven"),
    "job": ("baker", "smith", "poet", "miner", "sailor", "judge", "farmer", "monk"),
    "pet": ("cat", "dog", "owl", "frog", "goat", "crab", "mole", "hawk"),
    "tool": ("axe", "rope", "lamp", "net", "saw", "drum", "key", "bell"),
}

# Pretraining templates for one fact; {e} entity, {a} attribute, {v} value.
_FACT_TEMPLATES: tuple[str, ...] = (
    "the {a} of {e} is {v} .",
    "{e} 's {a} is {v} .",
    "as for {e} , its {a} is {v} .",
    "people say the {a} of {e} is {v} .",
)

# New downstream format: tokens "Q", ":", "?", "=>", "A" never occur in pretraining.
_QUESTION_TEMPLATE = "Q : {e} ? {a} => A :"

# Tiny filler grammar (public, fact-free language).
_DET = ("the", "a", "one", "every", "some")
_ADJ = ("old", "small", "quiet", "bright", "tall", "young", "slow", "happy", "wild", "cold")
_NOUN = ("man", "woman", "child", "river", "tree", "house", "bird", "road", "hill", "boat", "cloud", "stone")
_VERB = ("walks", "sleeps", "sings", "waits", "runs", "rests", "looks", "turns", "stays", "falls")
_PREP = ("near", "under", "over", "behind", "beside", "past", "into", "across")
_CONJ = ("and", "but", "while", "because", "so")
_MISC = (",", ".", "'s", "its", "is", "of", "as", "for", "people", "say", "has")

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "gr",
    "kr",
    "tr",
    "sh",
    "th",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "k", "l", "m", "x")


@dataclass(frozen=True)
class World:
    """The generated world: families, their members (entities), facts, and the split.

    A family name is ``family_len`` syllable words drawn from a small shared pool
    (``"ka lo tu"``), so no single token identifies a family: the model has to combine
    several tokens, which pushes the fact lookup out of the embeddings into the blocks.
    An entity is ``"<given> <family>"``; every member of a family shares
    the family's attribute values, so ``facts[e][a] == family_facts[family][a]``.
    Families are split into fine-tuning families and held-out families (disjoint), so
    the fine-tuning data reveals nothing about the held-out facts: the model can answer
    held-out questions only from what pretraining stored in its weights.
    """

    seed: int
    given_names: tuple[str, ...]
    syllables: tuple[str, ...]
    families: tuple[str, ...]
    family_facts: dict[str, dict[str, str]]
    members: dict[str, tuple[str, ...]]
    train_families: tuple[str, ...]
    eval_families: tuple[str, ...]
    attributes: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(ATTRIBUTES))

    @property
    def entities(self) -> tuple[str, ...]:
        """All entities (``"<given> <family>"``), family by family."""
        return tuple(e for f in self.families for e in self.members[f])

    @property
    def train_entities(self) -> tuple[str, ...]:
        return tuple(e for f in self.train_families for e in self.members[f])

    @property
    def eval_entities(self) -> tuple[str, ...]:
        return tuple(e for f in self.eval_families for e in self.members[f])

    def fact(self, entity: str, attribute: str) -> str:
        """Value of ``attribute`` for ``entity`` (its family's value)."""
        return self.family_facts[entity.split(" ", 1)[1]][attribute]


def _reserved_words() -> set[str]:
    words: set[str] = set(SPECIAL_TOKENS)
    for a, vals in ATTRIBUTES.items():
        words.add(a)
        words.update(vals)
    for group in (_DET, _ADJ, _NOUN, _VERB, _PREP, _CONJ, _MISC):
        words.update(group)
    words.update(_QUESTION_TEMPLATE.format(e="x", a="y").split())
    return words


def _names(rng: random.Random, n: int, taken: set[str], syllables: tuple[int, ...]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        k = rng.choice(syllables)
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(k - 1))
        name += rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
        if name in taken or len(name) < 4:
            continue
        taken.add(name)
        names.append(name)
    return names


def build_world(
    seed: int = 0,
    n_train_families: int = 24,
    n_eval_families: int = 24,
    train_members: int = 20,
    eval_members: int = 8,
    n_given_names: int = 60,
    n_syllables: int = 12,
    family_len: int = 3,
) -> World:
    """Generate the world deterministically from ``seed``.

    Each family gets one value per attribute in :data:`ATTRIBUTES` (uniform draw) and a
    set of members with distinct given names.  With the defaults: 48 families,
    24 x 20 fine-tuning entities (2880 train records) and 24 x 8 held-out entities
    (1152 eval questions); the model must store 48 x 6 = 288 family facts.
    """
    rng = random.Random(f"offsite-demo-world-{seed}")
    taken = _reserved_words()
    given = _names(rng, n_given_names, taken, (1, 2))
    syllables = _names(rng, n_syllables, taken, (1,))
    combos: set[str] = set()
    while len(combos) < n_train_families + n_eval_families:
        combos.add(" ".join(rng.choice(syllables) for _ in range(family_len)))
    families = sorted(combos)
    rng.shuffle(families)
    family_facts = {f: {a: rng.choice(vals) for a, vals in ATTRIBUTES.items()} for f in families}
    members: dict[str, tuple[str, ...]] = {}
    for i, f in enumerate(families):
        k = train_members if i < n_train_families else eval_members
        members[f] = tuple(f"{g} {f}" for g in rng.sample(given, k))
    return World(
        seed=seed,
        given_names=tuple(given),
        syllables=tuple(syllables),
        families=tuple(families),
        family_facts=family_facts,
        members=members,
        train_families=tuple(families[:n_train_families]),
        eval_families=tuple(families[n_train_families:]),
    )


def _filler_sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_DET)} {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)}"
    if rng.random() < 0.7:
        s += f" {rng.choice(_PREP)} the {rng.choice(_ADJ)} {rng.choice(_NOUN)}"
    if rng.random() < 0.3:
        s += f" {rng.choice(_CONJ)} {rng.choice(_DET)} {rng.choice(_NOUN)} {rng.choice(_VERB)}"
    return s + " ."


def _profile_sentence(world: World, e: str, rng: random.Random) -> str:
    attrs = list(world.attributes)
    rng.shuffle(attrs)
    body = " , ".join(f"{a} {world.fact(e, a)}" for a in attrs)
    return f"{e} has {body} ."


def pretraining_corpus(
    world: World, n_docs: int = 6000, seed: int = 0, profile_rate: float = 0.5, filler_rate: float = 0.2
) -> list[str]:
    """Pretraining documents: facts of every entity mixed with filler sentences.

    Each document is a short line of 2-4 sentences (under 64 tokens).  A sentence is a
    filler sentence with probability ``filler_rate``; otherwise it is about the next
    entity in a round-robin over the shuffled entities (so every entity appears about
    equally often): with probability ``profile_rate`` a dense profile listing all its
    attributes in random order (``"zorb has color red , food rice , ... ."``), else a
    single fact in one of several templates (``"the color of zorb is red ."``).
    """
    rng = random.Random(f"offsite-demo-pretrain-{world.seed}-{seed}")
    order: list[str] = []
    attrs = list(world.attributes)
    docs: list[str] = []
    for _ in range(n_docs):
        sents: list[str] = []
        for _ in range(rng.randint(2, 4)):
            if rng.random() < filler_rate:
                sents.append(_filler_sentence(rng))
                continue
            if not order:
                order = list(world.entities)
                rng.shuffle(order)
            e = order.pop()
            if rng.random() < profile_rate:
                sents.append(_profile_sentence(world, e, rng))
            else:
                a = rng.choice(attrs)
                sents.append(rng.choice(_FACT_TEMPLATES).format(e=e, a=a, v=world.fact(e, a)))
        docs.append(" ".join(sents))
    return docs


def distillation_corpus(n_docs: int = 2000, seed: int = 0) -> list[str]:
    """Small public, fact-free text set the owner may use to distil the emulator.

    Only filler-grammar sentences: no entity names, so distillation improves the
    emulator as a language model without restoring the world's facts.
    """
    rng = random.Random(f"offsite-demo-distill-{seed}")
    return [" ".join(_filler_sentence(rng) for _ in range(rng.randint(3, 6))) for _ in range(n_docs)]


def render_question(entity: str, attribute: str) -> str:
    """The downstream question prompt (a format never seen in pretraining)."""
    return _QUESTION_TEMPLATE.format(e=entity, a=attribute)


def downstream_task(
    world: World, n_choices: int = 4, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, object]]]:
    """The private downstream task: ``(train_records, eval_records)``.

    * ``train_records``: ``{"prompt", "completion"}`` for every (train entity, attribute);
      the completion is ``" " + value`` (loss on the completion only).
    * ``eval_records``: multiple choice ``{"question", "choices", "answer"}`` for every
      (held-out entity, attribute): ``n_choices`` values of that attribute (the true one
      plus distractors, deterministically shuffled), each with a leading space;
      ``answer`` is the index of the true value.

    With the defaults: 480 x 6 = 2880 train records, 192 x 6 = 1152 eval records.
    """
    rng = random.Random(f"offsite-demo-task-{world.seed}-{seed}")
    train: list[dict[str, str]] = []
    for e in world.train_entities:
        for a in world.attributes:
            train.append({"prompt": render_question(e, a), "completion": " " + world.fact(e, a)})
    rng.shuffle(train)
    evals = [_mc_question(world, e, a, rng, n_choices) for e in world.eval_entities for a in world.attributes]
    return train, evals


def _mc_question(world: World, e: str, a: str, rng: random.Random, n_choices: int) -> dict[str, object]:
    """A multiple-choice question: the true value and ``n_choices - 1`` distractors, shuffled."""
    true = world.fact(e, a)
    choices = [true] + rng.sample([v for v in world.attributes[a] if v != true], n_choices - 1)
    rng.shuffle(choices)
    return {
        "question": render_question(e, a),
        "choices": [" " + c for c in choices],
        "answer": choices.index(true),
    }


def _entity_and_attribute(prompt: str) -> tuple[str, str]:
    """Invert :func:`render_question`: ``"Q : kavu ba ti lo ? food => A :"`` -> (entity, attribute)."""
    head, _, tail = prompt.removeprefix("Q : ").partition(" ? ")
    return head, tail.partition(" => ")[0]


def validation_split(
    world: World, train: list[dict[str, str]], fraction: float = 0.1, seed: int = 0, n_choices: int = 4
) -> tuple[list[dict[str, str]], list[dict[str, object]]]:
    """Split fine-tuning records into (training part, validation questions) for hyperparameter selection.

    The evaluation asks about *families* the fine-tuning data never mentions, so a random split
    of records would reward memorising family facts (other members of a validation entity's family
    stay in training). This split holds out *whole fine-tuning families* instead, drawn in a
    ``seed``-shuffled order until they hold at least ``fraction`` of the records, and turns their
    records into multiple-choice questions built as the evaluation's are. It never looks at the
    evaluation set.
    """
    family_of = {e: f for f in world.train_families for e in world.members[f]}
    by_family: dict[str, list[dict[str, str]]] = {}
    for r in train:
        entity, _ = _entity_and_attribute(r["prompt"])
        by_family.setdefault(family_of[entity], []).append(r)
    order = sorted(by_family)
    rng = random.Random(f"offsite-demo-validation-{world.seed}-{seed}")
    rng.shuffle(order)
    held: set[str] = set()
    count = 0
    for f in order:
        if count >= fraction * len(train):
            break
        held.add(f)
        count += len(by_family[f])
    rest = [r for r in train if family_of[_entity_and_attribute(r["prompt"])[0]] not in held]
    questions = [
        _mc_question(world, *_entity_and_attribute(r["prompt"]), rng, n_choices)
        for r in train
        if family_of[_entity_and_attribute(r["prompt"])[0]] in held
    ]
    return rest, questions


def build_tokenizer(world: World) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` (WordLevel, whitespace-split) over the world's vocabulary.

    Vocabulary: special tokens (ids 0-3: ``<pad> <bos> <eos> <unk>``), then every word
    that can occur in the corpus, the distillation set or the downstream task, in a
    deterministic order.  Encoding adds ``<bos>`` in front (template post-processor).
    Wrap it with ``transformers.PreTrainedTokenizerFast(tokenizer_object=tok,
    bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")`` if an
    HF tokenizer is needed.
    """
    words: list[str] = list(SPECIAL_TOKENS)
    seen = set(words)

    def add(ws: object) -> None:
        for w in ws:  # type: ignore[attr-defined]
            if w not in seen:
                seen.add(w)
                words.append(w)

    for group in (_DET, _ADJ, _NOUN, _VERB, _PREP, _CONJ, _MISC):
        add(group)
    add(ATTRIBUTES)
    for vals in ATTRIBUTES.values():
        add(vals)
    add(_QUESTION_TEMPLATE.format(e="", a="").split())
    add(world.given_names)
    add(world.syllables)
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok
