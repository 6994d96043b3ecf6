"""Cost of titok-gen's ROUGE-L dedup at 5,000 kept queries: ours vs the naive rouge-score loop.

Synthetic BBH-like queries (a few task formats with random fillers, so many pairs share most of
their words and some are near-duplicates) stream through the dedup until 5,000 are kept, with
10 seed examples in the pool, threshold 0.7. The naive loop (rouge_scorer.RougeScorer(['rougeL'],
use_stemmer=True).score against every pooled text, Self-Instruct style) is far too slow for the
whole run, so it runs on the first --naive-candidates candidates, must make the same keep/reject
decisions there, and its cost at 5,000 is extrapolated from its measured seconds per pair times
the number of pairs the full run compares.

    python bench/bench_dedup.py [--kept 5000] [--naive-candidates 400]
"""
import argparse
import random
import time

from rouge_score import rouge_scorer

from titok_tools.dedup import RougeDedup

NAMES = ["Lionel Messi", "Tom Brady", "Serena Williams", "LeBron James", "Kylian Mbappe", "Aaron Judge", "Connor McDavid",
         "Naomi Osaka", "Patrick Mahomes", "Stephen Curry", "Shohei Ohtani", "Sidney Crosby"]
ACTIONS = ["scored a touchdown", "hit a home run", "dunked the ball", "took a penalty kick", "served an ace",
           "threw a perfect pass", "scored a hat trick", "caught the screen pass", "hit a three pointer",
           "committed a hand ball", "was called offside", "skated to the blue line", "drew a foul"]
EVENTS = ["the Super Bowl", "the World Cup", "the Stanley Cup final", "Wimbledon", "the NBA finals", "the World Series",
          "the second half", "overtime", "the first period", "the Champions League"]
WORDS = ("apple river stone window garden silver music paper orange yellow bridge castle forest mountain ocean pencil "
         "rabbit turtle violin whistle lantern marble candle meadow harbor falcon glacier island jungle kettle ladder "
         "needle oyster pepper quartz saddle tunnel velvet walnut zephyr anchor basket cactus dragon ember feather").split()
COLORS = ["red", "blue", "green", "purple", "orange", "yellow", "black", "white", "gray", "brown"]
THINGS = ["pen", "ball", "cup", "book", "key", "sock", "plate", "scarf", "mug", "stress ball"]


def query(rng):
    kind = rng.randrange(4)
    if kind == 0:
        return f'Is the following sentence plausible? "{rng.choice(NAMES)} {rng.choice(ACTIONS)} in {rng.choice(EVENTS)}."'
    if kind == 1:
        return "Sort the following words alphabetically: List: " + " ".join(rng.sample(WORDS, rng.randint(6, 16)))
    if kind == 2:
        items = ", ".join(f"a {rng.choice(COLORS)} {rng.choice(THINGS)}" for _ in range(rng.randint(2, 5)))
        return (f"On the desk, you see {items}. What is the color of the {rng.choice(THINGS)}?\n"
                "Options:\n" + "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(COLORS)))
    steps = ". ".join(f"Take {rng.randint(1, 9)} steps {rng.choice(['forward', 'backward', 'left', 'right'])}"
                      for _ in range(rng.randint(2, 6)))
    return f"If you follow these instructions, do you return to the starting point? Always face forward. {steps}."


def fast_run(seeds, candidates, threshold, kept_target):
    pool = RougeDedup(threshold)
    for s in seeds:
        pool.add(s)
    decisions, kept = [], 0
    started = time.perf_counter()
    for text in candidates:
        keep = pool.best(text)[1] is None
        decisions.append(keep)
        if keep:
            pool.add(text)
            kept += 1
            if kept >= kept_target:
                break
    return time.perf_counter() - started, decisions, pool.stats


def naive_run(seeds, candidates, threshold):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pool, decisions, pairs = list(seeds), [], 0
    started = time.perf_counter()
    for text in candidates:
        scores = [scorer.score(p, text)["rougeL"].fmeasure for p in pool]
        pairs += len(pool)
        keep = max(scores, default=0.0) < threshold
        decisions.append(keep)
        if keep:
            pool.append(text)
    return time.perf_counter() - started, decisions, pairs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kept", type=int, default=5000)
    parser.add_argument("--naive-candidates", type=int, default=400)
    parser.add_argument("--threshold", type=float, default=0.7)
    args = parser.parse_args()

    rng = random.Random(0)
    seeds = [query(rng) for _ in range(10)]
    candidates = [query(rng) for _ in range(args.kept * 20)]

    seconds, decisions, stats = fast_run(seeds, candidates, args.threshold, args.kept)
    n_candidates, n_kept = len(decisions), sum(decisions)
    print(f"fast dedup: {n_candidates} candidates -> {n_kept} kept in {seconds:.2f} s "
          f"({1e3 * seconds / n_candidates:.2f} ms per candidate)")
    print(f"  pairs {stats['pairs']:,}: pruned by length ratio {stats['length_pruned']:,}, "
          f"by token overlap {stats['overlap_pruned']:,}, exact LCS computed {stats['lcs']:,}")

    subset = candidates[: args.naive_candidates]
    naive_seconds, naive_decisions, naive_pairs = naive_run(seeds, subset, args.threshold)
    fast_subset_seconds, fast_decisions, _ = fast_run(seeds, subset, args.threshold, len(subset))
    assert fast_decisions == naive_decisions, "the fast dedup decided differently from rouge-score"
    per_pair = naive_seconds / naive_pairs
    full_pairs = sum(len(seeds) + sum(decisions[:i]) for i in range(n_candidates))
    print(f"naive rouge-score loop on the first {len(subset)} candidates: {naive_seconds:.2f} s for {naive_pairs:,} pairs "
          f"({1e6 * per_pair:.1f} us per pair); fast on the same: {fast_subset_seconds:.3f} s; same decisions")
    print(f"naive at {n_kept} kept (extrapolated: {full_pairs:,} pairs x {1e6 * per_pair:.1f} us): "
          f"{full_pairs * per_pair / 60:.1f} min vs fast {seconds:.2f} s ({full_pairs * per_pair / seconds:.0f}x)")


if __name__ == "__main__":
    main()
