"""chattasks' tasks: natural-language problems with one short, exactly scorable answer (exact match).

Word-, number- and format-level (a BPE vocabulary makes letter-level tasks hard), in two kinds, as in MeteoRA's
benchmark where the task must be told from the input alone:
    instruction  the prompt says what to do: "Reverse the order of the words: red blue green" -> "green blue red"
    form         the prompt is only the input, its form tells: "2023-07-14" -> "14 July 2023", "7, 2, 9" -> "9"
No two tasks take inputs that look alike. Vocabularies are embedded, so samples are reproducible from a seed;
`split_samples` gives disjoint train and eval prompts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

# ---------------------------------------------------------------- vocabularies
COLORS = "red blue green yellow black white orange purple pink brown gray silver gold".split()
ANIMALS = ("cat dog horse cow sheep goat pig duck goose chicken rabbit mouse lion tiger bear wolf fox "
           "deer owl eagle snake frog fish whale shark monkey zebra camel").split()
FRUITS = "apple banana cherry grape lemon mango melon orange peach pear plum kiwi lime fig".split()
THINGS = ("table chair window door lamp book pen cup plate spoon fork knife bottle bag hat coat shoe "
          "clock phone desk bed sofa box key ring coin ball kite boat car bus train bike").split()
PLACES = "house garden park school river forest city village beach island mountain road bridge market".split()
# words for word-list tasks: single common words, all lowercase, unique
LIST_WORDS = sorted(set(COLORS + ANIMALS + FRUITS + THINGS + PLACES))

ADJS = ("small big old young happy tired quiet loud brown little hungry lazy clever busy friendly "
        "angry sleepy tall short heavy").split()
SUBJ_NOUNS = ("cat dog boy girl man woman teacher farmer child baby bird horse driver doctor student "
              "neighbor cook king queen captain").split()
OBJ_NOUNS = ("ball book letter apple door window song car ticket cake bread box kite story picture "
             "bottle key map phone hat").split()
VERBS_T = ("found opened closed painted wrote read bought sold carried dropped lost washed cleaned "
           "kicked watched ate cooked broke fixed hid").split()
VERBS_I = "slept laughed smiled waited danced sang cried shouted ran walked jumped swam".split()
PREPS = "in near under behind beside on".split()
DETS = "the my our his her their this that every your".split()
TIMES = "today yesterday again quickly slowly early late together".split()

FIRST_NAMES = ("james mary john patricia robert jennifer michael linda william elizabeth david barbara "
               "richard susan joseph jessica thomas sarah charles karen daniel nancy matthew lisa anthony "
               "betty mark sandra paul ashley steven emily andrew donna kevin michelle brian carol george "
               "amanda edward melissa ronald deborah timothy laura jason rebecca").split()
LAST_NAMES = ("smith johnson williams brown jones miller davis wilson anderson taylor thomas moore martin "
              "jackson white harris clark lewis robinson walker young allen king wright scott green baker "
              "adams nelson hill campbell mitchell roberts carter phillips evans turner parker collins "
              "edwards stewart morris murphy cook rogers morgan cooper").split()
DOMAINS = "example.com mail.com company.org school.edu office.net work.io shop.com news.org".split()

MONTHS = ("January February March April May June July August September October November "
          "December").split()

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

ID_WORDS = ("user first last name max min retry count total page size item price order id file path "
            "start end time date error code status message list index value key default timeout "
            "buffer length number account email address city zip phone").split()

JSON_KEYS = {
    "name": [n.capitalize() for n in FIRST_NAMES],
    "city": "Paris London Berlin Madrid Rome Tokyo Cairo Lima Oslo Dublin Vienna Prague Boston Denver Austin".split(),
    "color": COLORS,
    "pet": ANIMALS,
    "fruit": FRUITS,
    "job": "teacher doctor farmer driver cook nurse pilot baker writer lawyer".split(),
    "day": "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
}


def num_words(n: int) -> str:
    """English words for 0 <= n <= 9999 (e.g. 347 -> 'three hundred forty-seven')."""
    assert 0 <= n <= 9999
    if n < 20:
        return ONES[n]
    if n < 100:
        t, o = divmod(n, 10)
        return TENS[t] + ("-" + ONES[o] if o else "")
    if n < 1000:
        h, r = divmod(n, 100)
        return ONES[h] + " hundred" + (" " + num_words(r) if r else "")
    th, r = divmod(n, 1000)
    return ONES[th] + " thousand" + (" " + num_words(r) if r else "")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "instruction" (the prompt says what to do) | "form" (only the input's form tells)
    generate: Callable[[random.Random], tuple[str, str]]  # -> (prompt, response)
    example: str = ""  # one line: an input -> its answer

    def sample(self, rng: random.Random) -> dict:
        prompt, response = self.generate(rng)
        return {"prompt": prompt, "response": response}


# ---------------------------------------------------------------- generators
def _words(rng, lo, hi, distinct=True):
    k = rng.randint(lo, hi)
    return rng.sample(LIST_WORDS, k) if distinct else [rng.choice(LIST_WORDS) for _ in range(k)]


def g_reverse_words(rng):
    w = _words(rng, 3, 6)
    return f"Reverse the order of the words: {' '.join(w)}", " ".join(reversed(w))


def g_dedupe_words(rng):
    base = _words(rng, 3, 5)
    dup = rng.sample(base, rng.randint(1, 2))
    seq = base + dup
    # shuffle but keep it so that at least one duplicate comes after its first occurrence (always true)
    rng.shuffle(seq)
    seen, out = set(), []
    for x in seq:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return f"Remove the repeated words: {' '.join(seq)}", " ".join(out)


def g_count_words(rng):
    w = _words(rng, 2, 9)
    return f"How many words are in this list? {' '.join(w)}", str(len(w))


def g_num_to_words(rng):
    n = rng.randint(21, 9999)
    return f"Write the number {n} in words.", num_words(n)


def g_larger(rng):
    a, b = rng.sample(range(10, 1000), 2)
    return f"Which number is larger, {a} or {b}?", str(max(a, b))


def g_parity(rng):
    n = rng.randint(10, 99999)
    return f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd"


def g_round_hundred(rng):
    n = rng.randint(101, 9999)
    while n % 100 == 50:
        n = rng.randint(101, 9999)
    return f"Round {n} to the nearest hundred.", str(int(round(n / 100.0)) * 100)


def g_join_commas(rng):
    w = _words(rng, 3, 6)
    return f"Write these words as a comma-separated list: {' '.join(w)}", ", ".join(w)


def g_add_each(rng):
    k = rng.randint(3, 5)
    d = rng.randint(2, 9)
    xs = [rng.randint(1, 60) for _ in range(k)]
    return f"Add {d} to each number: {' '.join(map(str, xs))}", " ".join(str(x + d) for x in xs)


def g_repeat_word(rng):
    w = rng.choice(LIST_WORDS) if rng.random() < 0.5 else f"{rng.choice(ADJS)} {rng.choice(ANIMALS + THINGS)}"
    k = rng.randint(2, 6)
    sep = rng.choice(["", " with commas"])
    p = f"Write \"{w}\" {k} times{sep}."
    return p, (", " if sep else " ").join([w] * k)


def g_word_after(rng):
    w = _words(rng, 4, 7)
    i = rng.randint(0, len(w) - 2)
    return f"Which word comes right after \"{w[i]}\" in: {' '.join(w)}", w[i + 1]


def g_swap_first_last(rng):
    w = _words(rng, 4, 7)
    o = [w[-1]] + w[1:-1] + [w[0]]
    return f"Swap the first and last words: {' '.join(w)}", " ".join(o)


def g_words_to_digits(rng):
    n = rng.randint(21, 9999)
    return f"Write as digits: {num_words(n)}", str(n)


def g_nth_word(rng):
    w = _words(rng, 4, 7)
    i = rng.randint(0, len(w) - 1)
    ords = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh"]
    return f"What is the {ords[i]} word in: {' '.join(w)}", w[i]


# ---- form-only tasks (no instruction at all)
def g_iso_date(rng):
    y = rng.randint(1950, 2039)
    m = rng.randint(1, 12)
    d = rng.randint(1, 28)
    return f"{y:04d}-{m:02d}-{d:02d}", f"{d} {MONTHS[m - 1]} {y}"


def g_addition(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} + {b}", str(a + b)


def g_list_max(rng):
    k = rng.randint(4, 6)
    xs = rng.sample(range(1, 100), k)
    return ", ".join(map(str, xs)), str(max(xs))


def _sentence(rng):
    t = rng.randint(0, 2)
    d1, d2 = rng.choice(DETS), rng.choice(DETS)
    if t == 0:
        s = [d1, rng.choice(ADJS), rng.choice(SUBJ_NOUNS), rng.choice(VERBS_T), d2, rng.choice(OBJ_NOUNS)]
    elif t == 1:
        s = [d1, rng.choice(SUBJ_NOUNS), rng.choice(VERBS_I), rng.choice(PREPS), d2, rng.choice(PLACES)]
    else:
        s = [d1, rng.choice(SUBJ_NOUNS), rng.choice(VERBS_T), d2, rng.choice(ADJS), rng.choice(OBJ_NOUNS),
             rng.choice(TIMES)]
    return " ".join(s)


def g_fix_sentence(rng):
    s = _sentence(rng)
    return s, s[0].upper() + s[1:] + "."


def g_time24(rng):
    h, m = rng.randint(0, 23), rng.randint(0, 59)
    h12 = h % 12 or 12
    return f"{h:02d}:{m:02d}", f"{h12}:{m:02d} {'AM' if h < 12 else 'PM'}"


def g_email_name(rng):
    f, l = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    return f"{f}.{l}@{rng.choice(DOMAINS)}", f"{f.capitalize()} {l.capitalize()}"


def g_last_first(rng):
    f, l = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    return f"{l.capitalize()}, {f.capitalize()}", f"{f.capitalize()} {l.capitalize()}"


def g_int_commas(rng):
    n = rng.randint(10_000, 99_999_999)
    return str(n), f"{n:,}"


def g_snake_label(rng):
    w = rng.sample(ID_WORDS, rng.randint(2, 4))
    return "_".join(w), " ".join(x.capitalize() for x in w)


def g_kv_json(rng):
    keys = rng.sample(sorted(JSON_KEYS), rng.randint(2, 3))
    vals = [rng.choice(JSON_KEYS[k]) for k in keys]
    p = "; ".join(f"{k}={v}" for k, v in zip(keys, vals))
    r = "{" + ", ".join(f'"{k}": "{v}"' for k, v in zip(keys, vals)) + "}"
    return p, r


TASKS = {t.name: t for t in [
    # instruction tasks
    Task("reverse_words", "instruction", g_reverse_words, "Reverse the order of the words: a b c -> c b a"),
    Task("dedupe_words", "instruction", g_dedupe_words, "Remove the repeated words: a b a c -> a b c"),
    Task("count_words", "instruction", g_count_words, "How many words are in this list? a b c -> 3"),
    Task("num_to_words", "instruction", g_num_to_words, "Write the number 347 in words. -> three hundred forty-seven"),
    Task("larger", "instruction", g_larger, "Which number is larger, 47 or 74? -> 74"),
    Task("parity", "instruction", g_parity, "Is 347 even or odd? -> odd"),
    Task("round_hundred", "instruction", g_round_hundred, "Round 3847 to the nearest hundred. -> 3800"),
    Task("join_commas", "instruction", g_join_commas, "Write these words as a comma-separated list: a b c -> a, b, c"),
    Task("add_each", "instruction", g_add_each, "Add 3 to each number: 4 8 15 -> 7 11 18"),
    Task("repeat_word", "instruction", g_repeat_word, 'Write "apple" 3 times. -> apple apple apple'),
    Task("word_after", "instruction", g_word_after, 'Which word comes right after "b" in: a b c -> c'),
    Task("swap_first_last", "instruction", g_swap_first_last, "Swap the first and last words: a b c d -> d b c a"),
    Task("words_to_digits", "instruction", g_words_to_digits, "Write as digits: forty-seven -> 47"),
    Task("nth_word", "instruction", g_nth_word, "What is the third word in: a b c d -> c"),
    # form-only tasks
    Task("iso_date", "form", g_iso_date, "2023-07-14 -> 14 July 2023"),
    Task("addition", "form", g_addition, "23 + 41 -> 64"),
    Task("list_max", "form", g_list_max, "7, 2, 9, 4 -> 9"),
    Task("fix_sentence", "form", g_fix_sentence, "the cat sat on the mat -> The cat sat on the mat."),
    Task("time24", "form", g_time24, "14:30 -> 2:30 PM"),
    Task("email_name", "form", g_email_name, "john.smith@example.com -> John Smith"),
    Task("last_first", "form", g_last_first, "Smith, John -> John Smith"),
    Task("int_commas", "form", g_int_commas, "1234567 -> 1,234,567"),
    Task("snake_label", "form", g_snake_label, "user_first_name -> User First Name"),
    Task("kv_json", "form", g_kv_json, 'name=Anna; city=Paris -> {"name": "Anna", "city": "Paris"}'),
]}


def split_samples(task: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and eval samples with distinct prompts, none in both."""
    rng, seen, samples = random.Random(f"{task}:{seed}"), set(), []
    for _ in range(200 * (n_train + n_eval)):
        sample = TASKS[task].sample(rng)
        if sample["prompt"] not in seen:
            seen.add(sample["prompt"])
            samples.append(sample)
            if len(samples) == n_train + n_eval:
                return samples[:n_train], samples[n_train:]
    raise ValueError(f"task {task}: fewer than {n_train + n_eval} distinct prompts")
