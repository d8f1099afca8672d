"""The overview's chart: the last hour's attempt outcomes per minute, as the geometry of an inline
SVG of stacked bars (drawn by templates/overview.html; no script, no image request)."""

from datetime import timedelta

from stepd.model import iso

MINUTES = 60
OUTCOMES = ("completed", "failed", "interrupted")  # bottom to top
BAR, GAP = 10, 2  # pixels
HEIGHT = 120  # pixels of the tallest bar
WIDTH = MINUTES * (BAR + GAP)


def window(now):
    """(the first minute shown, as stepd's UTC text; the minutes shown, oldest first) up to `now`'s."""
    last = now.replace(second=0, microsecond=0)
    minutes = [last - timedelta(minutes=MINUTES - 1 - n) for n in range(MINUTES)]
    return iso(minutes[0]), minutes


def chart(counts, now):
    """The bars of the hour up to `now`: `counts` is {(minute 'YYYY-MM-DDTHH:MM', outcome): n}."""
    _, minutes = window(now)
    per_minute = [{outcome: counts.get((iso(m)[:16], outcome), 0) for outcome in OUTCOMES} for m in minutes]
    tallest = max([sum(c.values()) for c in per_minute] + [1])
    bars = []
    for n, (minute, outcome_counts) in enumerate(zip(minutes, per_minute, strict=True)):
        x, top = n * (BAR + GAP), HEIGHT
        segments = []
        for outcome in OUTCOMES:
            height = round(outcome_counts[outcome] * HEIGHT / tallest, 1)
            if height:
                top -= height
                segments.append({"outcome": outcome, "y": round(top, 1), "height": height})
        said = ", ".join(f"{outcome_counts[o]} {o}" for o in OUTCOMES)
        bars.append({"x": x, "segments": segments, "title": f"{minute:%H:%M} UTC: {said}"})
    ticks = [{"x": n * (BAR + GAP), "label": f"{minutes[n]:%H:%M}"} for n in (0, 15, 30, 45)]
    return {
        "bars": bars,
        "ticks": ticks,
        "tallest": tallest,
        "totals": {o: sum(c[o] for c in per_minute) for o in OUTCOMES},
        "width": WIDTH,
        "height": HEIGHT,
        "bar": BAR,
    }
