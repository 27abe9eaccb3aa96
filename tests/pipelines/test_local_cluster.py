"""`make cluster-up` (and `make demo`, which starts the same head) on a machine that has never run Ray: token auth
is on, and `ray start` refuses to start without a token, which only `ray.init` or `ray get-auth-token --generate`
makes."""
import httpx

from pipelines import local_cluster


def test_up_makes_a_token_on_a_machine_that_has_none(tmp_path, monkeypatch):
    home = tmp_path / "home"  # a machine without ~/.ray/auth_token
    monkeypatch.setenv("HOME", str(home))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    cluster = local_cluster.up(tmp_path / "cluster", num_cpus=1)
    try:
        token = (home / ".ray" / "auth_token").read_text().strip()
        jobs = f"{cluster['address']}/api/jobs/"
        assert httpx.get(jobs, timeout=30).status_code == 401
        assert httpx.get(jobs, headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200
    finally:
        local_cluster.down(tmp_path / "cluster")
