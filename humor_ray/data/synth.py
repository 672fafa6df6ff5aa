"""`humor-ray data synth`: synthetic raw votes shaped like the real NEXT caption-contest data.

It writes what a raw-votes release looks like, for scale tests of `data build` (250M ratings):
- `votes/<contest>_votes_<shard:03d>.parquet`: one row per rating, columns `contest` int32,
  `caption_id` int32, `rating` int8 (1 unfunny, 2 somewhat funny, 3 funny), and with `--participants`
  also `participant` int32 and `timestamp` (whole seconds; Parquet reads it back as timestamp[ms]);
- `captions/<contest>_captions.parquet`: the lookup `contest` int32, `caption_id` int32, `caption` string.

Per contest: draw each caption's latent funniness, then its number of votes (adaptive sampling gives
the captions that look funniest many more votes), then the votes themselves. Everything is vectorised
numpy and seeded per contest (`default_rng([seed, contest])`), so the files are the same whatever
order Ray runs the tasks in. A contest with many votes is written as several shards, each its own
task, so memory stays bounded by the shard size however large the contest.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from humor_ray.config import ConfigError, Options, field
from humor_ray.data import readers
from humor_ray.data.outputs import written_aside
from humor_ray.log import get_logger

log = get_logger("data synth")

# ---------------------------------------------------------------- calibration
# Measured on the real data in /work/shared/data: the 176 contests with usable_for_humor=1 in
# contest_stats.csv, each through its primary summary file (974,655 captions, 116.4M votes).
FIRST_CONTEST = 1000                      # real contests are 497-895; synthetic ids never collide
VOTES_PER_CONTEST = 661_394               # mean votes per contest (min 17,119, max 2,249,813)
VOTES_PER_CONTEST_CV = 0.604              # sd / mean of that; contest sizes are drawn from a gamma
CAPTIONS_LOG_MEAN, CAPTIONS_LOG_SD = 8.585, 0.263  # captions per contest: lognormal fit (mean 5,538)
CAPTIONS_MIN, CAPTIONS_MAX = 2_919, 10_025         # fewest and most captions of a real contest
MIN_VOTES_PER_CAPTION = 4                 # lowest contest average (3.8, contest 517): caps the
#                                           captions of a contest too small for its caption count
# Targets the model below was fitted to (the tests check them too):
RATING_SHARES = (0.7312, 0.1921, 0.0767)  # share of all votes that are 1, 2, 3
CAPTION_MEAN_QUANTILES = {0.1: 1.042, 0.25: 1.115, 0.5: 1.195, 0.75: 1.277, 0.9: 1.363, 0.99: 1.600}
VOTES_REL_QUANTILES = {0.1: 0.384, 0.5: 0.822, 0.9: 1.247, 0.99: 4.874}  # votes / contest mean
DUPLICATE_SHARE = 0.009                   # captions that copy another's text: with the templates'
#                                           accidental repeats (~0.2%), 1.1% of a contest's captions
#                                           repeat a text (any case), as measured
PERSONAL_DATA_SHARE = 1 / 15_000          # captions carrying an e-mail address, URL or phone number

# The model. A caption's latent funniness z ~ N(0, 1) + LATENT_TAIL * max(z, 0)^2 (a few captions are
# far funnier than the rest); its ratings follow an ordered logit: P(rating >= 2) =
# sigmoid(B_SOMEWHAT + SLOPE * z), P(rating = 3) = sigmoid(B_FUNNY + SLOPE * z). Votes per caption,
# relative to the contest mean, follow the caption's latent rank in its contest (a share, 0 = funniest)
# as (rank, geometric mean, sd of log) knots, interpolated in log(rank), times lognormal noise.
# Measured, by rank on the observed mean, in buckets 0-0.1-0.3-1-3-10-30-50-70-100%: geometric means
# 12.3, 9.1, 5.5, 2.7, 1.48, 0.99, 0.77, 0.67, 0.53 (sd of log 1.59 ... 0.24 ... 0.46). Rank by latent
# funniness blurs those buckets, so the knots and the logit were fitted by simulating 12-60 whole
# contests with this module and matching RATING_SHARES, CAPTION_MEAN_QUANTILES and the buckets
# (simulated: shares 0.729/0.192/0.078, median caption mean 1.185, bucket means within 10%).
B_SOMEWHAT, B_FUNNY, SLOPE, LATENT_TAIL = -1.749, -3.424, 0.55, 0.129
VOTE_WEIGHTS = (
    (0.0003, 19.36, 1.550), (0.0017, 15.58, 1.229), (0.0055, 8.591, 1.138), (0.017, 3.837, 0.578),
    (0.055, 2.092, 0.100), (0.17, 1.419, 0.100), (0.39, 1.030, 0.100), (0.59, 0.832, 0.105),
    (0.84, 0.588, 0.486),
)

# Assumptions, not measured (the staged data has no per-vote records): for `--participants`.
VOTES_PER_PARTICIPANT = 30                # mean ratings per participant in a contest
VOTING_DAYS = 14                          # a contest's voting window; one new contest a week
VOTING_DECAY = 3.0                        # votes thin out over the window: rate ~ exp(-3 t / window)
FIRST_CONTEST_START = np.datetime64("2026-01-05T00:00:00", "s")

# Storage: shards of at most this many votes bound a task's memory (~20 bytes a vote at peak).
SHARD_VOTES = 8_000_000
ROW_GROUP_ROWS = 2_000_000

# ---------------------------------------------------------------- caption texts
# Templates with {slots}; each slot is filled from a word list (or a number range) with the
# contest's generator. The lists are long enough that accidental repeats are rare.
WORDS = {
    "who": ("Honey", "Doctor", "Officer", "Mom", "Dave", "Your Honor", "Sir", "Gentlemen", "Kids", "Frank",
            "Linda", "Professor", "Captain", "Sweetie", "Bob", "Madam", "Coach", "Everyone", "Harold",
            "Doc", "Carol", "Dad", "Ted", "Sheriff", "Ladies", "Your Majesty", "Nurse", "Boss", "Grandma",
            "Gary", "Marjorie", "Detective", "Counselor", "Chef", "Folks", "Reverend", "Agent Smith"),
    "interj": ("Relax", "Honestly", "Look", "Well", "Frankly", "Trust me", "For the record", "To be fair",
               "Between us", "Again", "Listen", "Technically", "In my defense", "Okay", "Believe me",
               "Sadly", "Oh, please", "Fine", "Let's be clear", "Hear me out"),
    "noun": ("the Wi-Fi", "the mortgage", "the merger", "the quarterly report", "my therapist", "the dog",
             "the landlord", "the algorithm", "your mother", "the board", "the neighbors", "the pilot",
             "the cat", "the intern", "the caterer", "the octopus", "the printer", "the committee",
             "the dragon", "the robot", "the penguin", "my lawyer", "the shark", "the IRS", "the startup",
             "the sommelier", "the HOA", "the babysitter", "the prenup", "the goldfish", "the jury",
             "the new guy", "the parrot", "the hedge fund", "the podcast", "the minotaur", "the bear",
             "the snowman", "the yoga instructor", "the Uber driver", "the giraffe", "the union",
             "the wine list", "the group chat", "the Roomba", "the plumber", "the mermaid", "the alpaca",
             "the stock market", "my ex", "the accountant", "the gym", "the elevator", "the time machine",
             "the headhunter", "the cloud", "the moose", "the pharaoh", "the focus group", "the butler",
             "the chatbot", "the barista", "the grim reaper", "the tooth fairy", "the dinosaur",
             "the valet", "the life coach", "the dentist", "the lobster", "the astronaut", "the cactus",
             "the mime", "the referee", "the cable guy", "the snake", "the auditor", "the unicorn",
             "the ghost", "the mayor", "the landlady"),
    "adj": ("overrated", "gluten-free", "tax deductible", "non-negotiable", "a metaphor", "artisanal",
            "on sabbatical", "in therapy", "remote now", "unionized", "still buffering", "vegan",
            "out of office", "under review", "organic", "recyclable", "on strike", "in escrow",
            "trending", "self-aware", "on a cleanse", "behind schedule", "in a better place",
            "fully vested", "off the grid", "on the fence", "between jobs", "carbon neutral",
            "emotionally unavailable", "pre-owned", "locally sourced", "under new management",
            "in rehab", "on probation", "a registered nonprofit", "in witness protection", "keto",
            "on a podcast", "in beta", "going through something"),
    "done": ("taken the stairs", "read the fine print", "called a plumber", "asked for directions",
             "brought snacks", "hired a consultant", "signed the waiver", "stayed in Ohio",
             "ordered the salad", "fed the fish", "canceled the subscription", "rented a canoe",
             "gone to Cleveland", "listened to your mother", "left the dog at home", "checked the reviews",
             "bought the extended warranty", "taken the left", "booked a table", "read the manual",
             "used a coupon", "kept the receipt", "hired a lawyer", "stuck to the budget"),
    "action": ("take the stairs", "read the fine print", "call a plumber", "ask for directions",
               "bring snacks", "hire a consultant", "sign the waiver", "order the salad", "feed the fish",
               "cancel the subscription", "rent a canoe", "update the software", "reply all",
               "skip leg day", "negotiate", "work from home", "try the fish", "speak to the manager",
               "follow your dreams", "go viral", "downsize", "leave a review", "rebrand", "unplug it",
               "read the room", "split the check", "file an extension", "ask for a raise",
               "take the scenic route", "feed the meter", "ignore the warning signs", "get a second opinion",
               "check the weather", "mute yourself", "trust the process", "call your mother",
               "read the terms and conditions", "circle back", "think outside the box", "buy local"),
    "place": ("in Brooklyn", "at the office", "on the subway", "in the Hamptons", "at brunch",
              "in couples therapy", "at the DMV", "in accounting", "on Mars", "at the zoo",
              "in the suburbs", "in Vermont", "at the board meeting", "on the first date", "in the lobby",
              "at the wedding", "in the break room", "at Thanksgiving", "on LinkedIn", "in Paris",
              "at the museum", "in the cloud", "at the open house", "in Philadelphia", "at the gym",
              "in the waiting room", "on the cruise", "at the reunion", "in the Senate", "at the bakery",
              "in New Jersey", "on Zoom", "at the car wash", "in the Arctic", "at the buffet",
              "in the lab", "at the airport", "on the golf course", "in the boardroom", "at the beach"),
    "time": ("since Tuesday", "all week", "since the merger", "since the divorce", "since the pandemic",
             "all morning", "for three fiscal quarters", "since the Jurassic", "since the reboot",
             "ever since the wedding", "for a while now", "since the last election", "all summer",
             "since brunch", "for six generations", "since the layoffs", "all night", "since the audit",
             "since the Renaissance", "since you got that podcast"),
    "later": ("after lunch", "next quarter", "in the spring", "never", "after my nap", "on Monday",
              "when the tide goes out", "after the audit", "in another life", "once the dust settles",
              "after the merger", "in a few centuries", "when pigs fly", "after the sequel", "next fall"),
    "thing": ("a tax write-off", "performance art", "a support group", "a pyramid scheme", "a startup",
              "a cry for help", "team building", "a side hustle", "a zoning issue", "a phase", "cardio",
              "a loophole", "a midlife crisis", "a learning experience", "a pilot program", "networking",
              "a conflict of interest", "self-care", "an open concept", "a soft launch", "a rental",
              "a family tradition", "a gray area", "a personal day", "a teachable moment",
              "a hostile takeover", "a vision board", "an emotional support animal", "a power move",
              "a rebrand", "an art installation", "a team-building exercise", "a gender reveal",
              "an intervention", "a bucket list item", "a trust fall", "a staycation", "a tax shelter",
              "a lifestyle choice", "a reality show", "a nonprofit", "a trial separation", "a hobby",
              "a coping mechanism", "a walking meeting"),
    "plural": ("snacks", "fewer stairs", "a pension", "dental", "an open bar", "parking", "fewer sharks",
               "casual Fridays", "more legroom", "a window seat", "breadsticks", "stock options",
               "a quieter neighborhood", "fewer meetings", "a second opinion", "better lighting",
               "free refills", "lifeguards", "a ramp", "fewer clowns", "air conditioning", "a moat",
               "name tags", "complimentary towels", "an exit strategy", "fewer wolves", "a bathroom",
               "assigned seating", "more candles", "a safe word", "a union rep", "better Wi-Fi",
               "hors d'oeuvres", "a dress code", "fewer snakes"),
    "doing": ("circling", "waiting for a table", "renegotiating", "working from home", "meaning to call you",
              "going in circles", "on hold", "rebranding", "downsizing", "in a meeting", "on a waitlist",
              "pivoting", "trying to cancel", "looking for parking", "stuck in traffic", "in mediation",
              "trying to unsubscribe", "on a juice cleanse", "in the wrong line", "hiding from the landlord"),
    # Most captions have no coda: the blanks weight the list.
    "coda": ("", "", "", "", "", "", "", "", " again", " for once", " this time", " in this economy",
             " on a Tuesday", " right now", " anymore", " today", " already", " at this hour",
             " for the third time", " as usual", " these days", " this late in the quarter", " before lunch",
             " without a permit", " on my watch", " in front of the kids", " on a weeknight",
             " during the audit", " at these prices", " in my own home", " after everything",
             " in broad daylight", " on company time", " while we're young", " if you must know",
             " in this weather", " before the holidays", " for tax reasons", " on principle", " at my age"),
    "user": ("jsmith", "captionfan", "m.baker", "funnybone42", "pat.lee", "drollguy", "lucy.w", "tkramer"),
    "domain": ("gmail", "yahoo", "aol", "hotmail", "example", "outlook", "comcast", "icloud"),
}
DIGITS = {"area": (201, 990), "exchange": (200, 1000), "line": (1000, 10000)}
TEMPLATES = (
    "{who}, I told you we should have {done}{coda}.",
    "I think {noun} is {adj}{coda}.",
    "{interj}, it's just {thing}{coda}.",
    "{who}, it's not {thing}, it's {thing}.",
    "{who}, {noun} has been {adj} {time}.",
    "{who}, and this is where we keep {noun}{coda}.",
    "Don't worry, {noun} is {adj}{coda}.",
    "{who}, we need to talk about {noun}{coda}.",
    "I'm sorry, {noun} only works {place}{coda}.",
    "{interj}, so much for {thing}{coda}.",
    "You should have seen what {noun} did {place}{coda}.",
    "{who}, this is why we can't have {plural} {place}.",
    "{who}, next time let's just {action}{coda}.",
    "{interj}, I was told there would be {plural} {place}.",
    "{interj}, I expected more from {noun}{coda}.",
    "{who}, is this about {noun}{coda}?",
    "Apparently {noun} is {adj} {place}.",
    "My therapist says {noun} is {thing}{coda}.",
    "{who}, have you met {noun}{coda}?",
    "On the bright side, {noun} is {adj}{coda}.",
    "{who}, this is what happens when you {action} {place}.",
    "{who}, please don't {action} {place}.",
    "{interj}, I'll have what {noun} is having{coda}.",
    "Say what you will about {noun}, but at least it's {adj}{coda}.",
    "{who}, it seemed like a good idea {place}{coda}.",
    "{interj}, we've been {doing} {place} {time}.",
    "{interj}, I'm not {adj}, I'm {adj}.",
    "{who}, it's {thing}{coda}.",
    "Remember when {noun} was {adj} {place}? Good times.",
    "{who}, I specifically asked for {plural}{coda}.",
    "{interj}, {noun} never saw it coming{coda}.",
    "{who}, tell {noun} I'll call back {later}.",
    "{interj}. We'll {action} {later}.",
    "{who}, I think {noun} wants to {action}.",
    "This is the last time I let {noun} plan {thing}{coda}.",
    "{interj}, the brochure said {adj} {place}.",
)
# Rare captions with personal data, for the scrubber (e-mail, URL, phone number).
PERSONAL_TEMPLATES = (
    "Email me at {user}@{domain}.com for the rest of the joke.",
    "{interj}, it's {thing}. More at www.{user}-captions.com",
    "Call me at ({area}) {exchange}-{line} if this one wins.",
    "{who}, I'm on https://{domain}.com/{user} now.",
)
_SLOT = re.compile(r"\{(\w+)\}")
_WORD_ARRAYS = {slot: pa.array(words) for slot, words in WORDS.items()}


# ---------------------------------------------------------------- config


@dataclasses.dataclass
class SynthConfig(Options):
    """Write synthetic raw votes and caption lookups, shaped like the real NEXT contest data."""
    output: str = field(None, "output directory or URI; an earlier synth output there is replaced",
                        required=True)
    ratings: int = field(None, "total number of ratings (vote rows) to write, exactly",
                         required=True, minimum=1)
    contests: int | None = field(None, "number of contests (default: ratings / the real average of "
                                       f"{VOTES_PER_CONTEST:,} per contest)", minimum=1)
    seed: int = field(2024, "seed: the same seed gives the same files", minimum=0)
    participants: bool = field(False, "also write participant and timestamp columns")
    overwrite: bool = field(False, "replace --output even when it holds files that are not an earlier synth output")

    def __post_init__(self):
        if not self.output:
            raise ConfigError("data synth needs --output")
        for name in ("ratings", "contests", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"--{name} must be a whole number, not {value!r}")
        if self.ratings is None:
            raise ConfigError("data synth needs --ratings")
        super().__post_init__()
        if self.contests is not None and not 1 <= self.contests <= self.ratings:
            raise ConfigError(f"--contests must be between 1 and --ratings ({self.ratings:,}): every "
                             f"contest needs a rating; got {self.contests}")



# ---------------------------------------------------------------- the plan: votes per contest and shard


def contest_votes(ratings: int, contests: int | None, seed: int) -> np.ndarray:
    """Votes per contest, summing to `ratings` exactly; each contest gets at least one."""
    n = contests or max(1, round(ratings / VOTES_PER_CONTEST))
    rng = np.random.default_rng([seed])
    shape = 1 / VOTES_PER_CONTEST_CV ** 2
    weights = rng.gamma(shape, 1.0, size=n)
    return 1 + rng.multinomial(ratings - n, weights / weights.sum())


def shard_sizes(votes: int) -> list[int]:
    """Equal shards of at most SHARD_VOTES."""
    n = math.ceil(votes / SHARD_VOTES)
    return [votes // n + (i < votes % n) for i in range(n)]


@dataclasses.dataclass
class Contest:
    """What every shard of a contest must agree on; cheap (per caption, not per vote) to recompute."""
    p_somewhat: np.ndarray       # P(rating >= 2) per caption
    p_funny: np.ndarray          # P(rating == 3) per caption
    shard_counts: np.ndarray     # votes per shard and caption, shape (shards, captions)
    rng: np.random.Generator     # the contest's generator, after the plan: shard 0 draws texts from it


def plan_contest(seed: int, contest: int, votes: int) -> Contest:
    rng = np.random.default_rng([seed, contest])
    drawn = int(np.clip(rng.lognormal(CAPTIONS_LOG_MEAN, CAPTIONS_LOG_SD), CAPTIONS_MIN, CAPTIONS_MAX))
    k = max(1, min(drawn, votes // MIN_VOTES_PER_CAPTION))
    z = rng.standard_normal(k)
    z += LATENT_TAIL * np.maximum(z, 0) ** 2
    p_somewhat = 1 / (1 + np.exp(-(B_SOMEWHAT + SLOPE * z)))
    p_funny = 1 / (1 + np.exp(-(B_FUNNY + SLOPE * z)))
    # Adaptive sampling: votes follow the caption's rank in its contest (by latent funniness).
    rank = (np.argsort(np.argsort(-z)) + 0.5) / k
    knots, geo, sd = (np.array(column) for column in zip(*VOTE_WEIGHTS))
    log_rank, log_knots = np.log(rank), np.log(knots)
    weights = np.exp(np.interp(log_rank, log_knots, np.log(geo))
                     + np.interp(log_rank, log_knots, sd) * rng.standard_normal(k))
    # Every caption gets a vote (no real caption has none); the rest go by weight.
    counts = 1 + rng.multinomial(votes - k, weights / weights.sum())
    shards = shard_sizes(votes)
    shard_counts = np.empty((len(shards), k), dtype=np.int64)
    for s, size in enumerate(shards):  # deal the caption's votes out to the shards
        shard_counts[s] = rng.multivariate_hypergeometric(counts, size, method="marginals")
        counts -= shard_counts[s]
    return Contest(p_somewhat, p_funny, shard_counts, rng)


# ---------------------------------------------------------------- generating one shard


def _fill(template: str, n: int, rng: np.random.Generator) -> pa.Array:
    """`n` texts from one template, every slot filled independently."""
    parts = []
    for i, piece in enumerate(_SLOT.split(template)):
        if i % 2 == 0:
            if piece:
                parts.append(piece)
        elif piece in DIGITS:
            parts.append(pa.array(rng.integers(*DIGITS[piece], size=n)).cast(pa.string()))
        else:
            words = _WORD_ARRAYS[piece]
            parts.append(words.take(rng.integers(len(words), size=n)))
    return pc.binary_join_element_wise(*parts, "")


def caption_texts(n: int, rng: np.random.Generator) -> pa.Array:
    """`n` caption texts: templates chosen at random, a few repeats and a few with personal data."""
    templates = TEMPLATES + PERSONAL_TEMPLATES
    p = np.r_[np.full(len(TEMPLATES), (1 - PERSONAL_DATA_SHARE) / len(TEMPLATES)),
              np.full(len(PERSONAL_TEMPLATES), PERSONAL_DATA_SHARE / len(PERSONAL_TEMPLATES))]
    choice = rng.choice(len(templates), size=n, p=p)
    order = np.argsort(choice, kind="stable")
    per_template = np.bincount(choice, minlength=len(templates))
    grouped = pa.concat_arrays([_fill(t, int(m), rng) for t, m in zip(templates, per_template) if m])
    texts = grouped.take(np.argsort(order))  # back from template order to caption order
    # Some contestants submit the same caption twice (separate ids and votes, as in the real data).
    repeat = rng.random(n) < DUPLICATE_SHARE
    source = np.where(repeat, rng.integers(n, size=n), np.arange(n))
    return texts.take(source)


def shard_table(seed: int, contest: int, plan: Contest, shard: int, participants: bool) -> pa.Table:
    """The votes of one shard, in random order (or in time order with participants)."""
    rng = np.random.default_rng([seed, contest, shard + 1])
    counts = plan.shard_counts[shard]
    caption_id = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    rng.shuffle(caption_id)
    u = rng.random(len(caption_id), dtype=np.float32)
    rating = (1 + (u < plan.p_somewhat.astype(np.float32)[caption_id])
              + (u < plan.p_funny.astype(np.float32)[caption_id])).astype(np.int8)
    columns = {"contest": np.full(len(caption_id), contest, dtype=np.int32), "caption_id": caption_id,
               "rating": rating}
    if participants:
        n_participants = max(1, round(int(plan.shard_counts.sum()) / VOTES_PER_PARTICIPANT))
        # floor(P * u^2): a few participants rate a lot, most rate a little (contest-local ids).
        columns["participant"] = (n_participants * rng.random(len(caption_id)) ** 2).astype(np.int32)
        # Truncated exponential over the voting window: most votes come early.
        window = VOTING_DAYS * 86_400
        fraction = -np.log1p(-rng.random(len(caption_id)) * -np.expm1(-VOTING_DECAY)) / VOTING_DECAY
        start = FIRST_CONTEST_START + np.timedelta64(7 * (contest - FIRST_CONTEST), "D")
        seconds = (fraction * window).astype(np.int64)
        order = np.argsort(seconds, kind="stable")
        columns = {name: values[order] for name, values in columns.items()}
        # timestamp[s]; Parquet has no seconds unit and stores it as whole-second milliseconds.
        columns["timestamp"] = start + seconds[order].astype("timedelta64[s]")
    return pa.table(columns)


def write_shard(output: str, seed: int, contest: int, votes: int, shard: int, participants: bool) -> dict:
    """One Ray task: write shard `shard` of a contest (and, for shard 0, the contest's captions)."""
    fs, root = readers.open_filesystem(output)
    plan = plan_contest(seed, contest, votes)
    table = shard_table(seed, contest, plan, shard, participants)
    pq.write_table(table, f"{root}/votes/{contest}_votes_{shard:03d}.parquet", filesystem=fs,
                   compression="zstd", row_group_size=ROW_GROUP_ROWS)
    result = {"ratings": table.num_rows, "files": 1, "captions": 0}
    if shard == 0:
        k = plan.shard_counts.shape[1]
        captions = pa.table({"contest": pa.array(np.full(k, contest, dtype=np.int32)),
                             "caption_id": pa.array(np.arange(k, dtype=np.int32)),
                             "caption": caption_texts(k, plan.rng)})
        pq.write_table(captions, f"{root}/captions/{contest}_captions.parquet", filesystem=fs,
                       compression="zstd")
        result.update(files=2, captions=k)
    return result


# ---------------------------------------------------------------- the driver


def run(cfg: SynthConfig) -> dict:
    """Write into a folder beside `--output` and put it in place once complete (humor_ray/data/outputs.py):
    stale shards of an earlier run never mix in, and an interrupted run leaves the earlier output."""
    with written_aside(cfg.output, "synthetic votes", ("votes", "captions"), cfg.overwrite) as work:
        return _write_all(dataclasses.replace(cfg, output=work), final=cfg.output)


def _write_all(cfg: SynthConfig, final: str) -> dict:
    import ray

    from humor_ray.cluster import init_ray

    started = time.perf_counter()
    votes = contest_votes(cfg.ratings, cfg.contests, cfg.seed)
    tasks = [(FIRST_CONTEST + i, int(v), shard) for i, v in enumerate(votes)
             for shard in range(len(shard_sizes(int(v))))]
    fs, root = readers.open_filesystem(cfg.output)
    for name in ("votes", "captions"):
        fs.create_dir(f"{root}/{name}", recursive=True)
    log.info(f"{cfg.ratings:,} ratings in {len(votes):,} contests ({FIRST_CONTEST}-{FIRST_CONTEST + len(votes) - 1}), "
             f"{len(tasks):,} shards -> {final}")

    init_ray()
    task = ray.remote(num_cpus=1)(write_shard)
    # At most two tasks per CPU in flight: enough to keep every CPU busy, few enough to bound memory.
    max_in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    summary = {"contests": len(votes), "captions": 0, "ratings": 0, "files": 0}
    pending, done, last_log = [], 0, 0.0

    def collect_one():
        nonlocal pending, done, last_log
        finished, pending = ray.wait(pending, num_returns=1)
        result = ray.get(finished[0])
        for key in ("captions", "ratings", "files"):
            summary[key] += result[key]
        done += 1
        if time.perf_counter() - last_log > 5 or done == len(tasks):
            last_log = time.perf_counter()
            log.info(f"{done:,}/{len(tasks):,} shards, {summary['ratings']:,} ratings, {last_log - started:.0f} s")

    for contest, n_votes, shard in tasks:
        if len(pending) >= max_in_flight:
            collect_one()
        pending.append(task.remote(cfg.output, cfg.seed, contest, n_votes, shard, cfg.participants))
    while pending:
        collect_one()
    if summary["ratings"] != cfg.ratings:  # a bug, not a user error: the plan sums to exactly N
        raise RuntimeError(f"wrote {summary['ratings']:,} ratings, expected {cfg.ratings:,}")
    summary["seconds"] = round(time.perf_counter() - started, 2)
    log.info(f"done: {summary['ratings']:,} ratings, {summary['captions']:,} captions, {summary['contests']:,} "
             f"contests, {summary['files']:,} files in {summary['seconds']} s")
    return summary
