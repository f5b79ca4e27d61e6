"""benchmarks/guess_miss.py's arithmetic: the previous token's threshold as a guess of the next token's Top-K set."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from guess_miss import guess_stats  # noqa: E402


def test_guess_stats_counts_missed_and_extra_rows():
    # token 0: |x| = 8, 7, 6, 5 -> k = 2 keeps {0, 1}, threshold 7. token 1 keeps {2, 3} (9, 8); the guess
    # |x| >= 7 takes {2, 3} only: nothing missed, nothing extra. token 2 keeps {0, 1} (4, 3.5); the guess
    # |x| >= 8 (token 1's threshold) takes nothing: both missed. token 3 keeps {2, 3} (9, 8); the guess
    # |x| >= 3.5 takes {0, 2, 3} (4, 9, 8): one extra.
    x = torch.tensor([[8.0, -7.0, 6.0, 5.0], [1.0, 2.0, -9.0, 8.0], [4.0, -3.5, 1.0, 0.5], [4.0, 1.0, 9.0, -8.0]])
    missed, extra = guess_stats(x, 2, 0.0)
    assert missed.tolist() == [0.0, 1.0, 0.0]
    assert extra.tolist() == [0.0, 0.0, 0.5]
    # a margin lowers the guess: token 2's guess becomes |x| >= 4 (8 * 0.5): {0} kept, one of two missed
    missed, extra = guess_stats(x, 2, 0.5)
    assert missed.tolist() == [0.0, 0.5, 0.0]
    assert extra.tolist() == [0.0, 0.0, 0.5]


def test_window_hits_follow_the_bf16_pattern_distance():
    from guess_miss import window_hits

    # k = 1: T_t = the row's max |x|. A window of 2^1 patterns is [h - 1, h + 1): 1.0 -> 1.0078125 is one bf16
    # pattern up (out), 1.0078125 -> 2.0 is 127 up (out), 2.0 -> 1.9921875 is one down (in); 2^8 holds all three
    x = torch.tensor([[1.0], [1.0078125], [2.0], [1.9921875]])
    assert window_hits(x, 1, window=1).tolist() == [False, False, True]
    assert window_hits(x, 1, window=8).tolist() == [True, True, True]


def test_static_precision_ranks_positions_on_other_tokens():
    from guess_miss import static_precision
    # ranking tokens keep {0, 1} twice and {0, 2} once (k = 2): position 0 first, then 1, then 2, then 3. On the
    # measured tokens the exact sets are {0, 3} and {1, 2}: the top 0.5 k = 1 ranked position (0) is kept in one of
    # two tokens; the top k = 2 (0, 1) hold one kept position per token.
    rank = torch.tensor([[9.0, 8.0, 1.0, 0.0], [9.0, -8.0, 1.0, 0.0], [9.0, 1.0, 8.0, 0.0]])
    x = torch.tensor([[5.0, 0.0, 1.0, -6.0], [0.0, 5.0, 6.0, 1.0]])
    assert static_precision(rank, x, 2) == [0.5, 0.5, 0.5, 0.5]
    x = torch.tensor([[5.0, 4.0, 1.0, 0.0], [-5.0, 4.0, 1.0, 0.0]])  # both keep {0, 1}: every prefix kept
    assert static_precision(rank, x, 2) == [1.0, 1.0, 1.0, 1.0]
