"""`hotops bench`: every family's cases timed side by side against the peer a user would pick.

Each family module (hotops/bench/<family>.py) exposes ``cases(quick) -> list[Case]``.
"""
FAMILIES = {
    "infonce": "hotops.bench.infonce",
}
