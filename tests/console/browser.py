#!/usr/bin/env python3
"""Drives Debian's headless chromium through chromedriver's WebDriver HTTP API (stdlib
only) against a running `nexusctl up` stack and its web console; run by
tests/tests/console.rs, which checks the JSON report this prints last. Screenshots go
to the folder named in the arguments.

Usage: browser.py CHROMEDRIVER_URL CONFIG_JSON
CONFIG: {"console": URL with token, "shots": DIR, "plugin_out": URL, "state": state.json,
         "nexusctl": PATH, "home": NEXUS_HOME, "plugin": SPIFFE ID}
"""
import base64
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

DRIVER = sys.argv[1]
CFG = json.loads(sys.argv[2])
REPORT = {"steps": []}


def wd(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(DRIVER + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"{}").get("value")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"webdriver {method} {path}: {e.read()[:400]!r}")


SESSION = wd("POST", "/session", {"capabilities": {"alwaysMatch": {
    "goog:chromeOptions": {"binary": CFG.get("chromium", "/usr/bin/chromium"), "args": [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--window-size=1280,1000", "--no-first-run", "--disable-extensions"]}}}})["sessionId"]
S = f"/session/{SESSION}"


def go(url):
    wd("POST", S + "/url", {"url": url})


def js(script, *args):
    return wd("POST", S + "/execute/sync", {"script": script, "args": list(args)})


def find(css):
    el = wd("POST", S + "/element", {"using": "css selector", "value": css})
    return list(el.values())[0]


def fresh(css, act, tries=5):
    """Finds `css` and acts on it. The live feed re-renders regions of the page when the
    gateway pushes a change (an acknowledgement arriving just after a revoke), so an
    element found a moment ago can be replaced before the click lands ("stale element
    reference"); a user's click would land on the new one, so find it again (bounded)."""
    for attempt in range(tries):
        try:
            return act(find(css))
        except RuntimeError as e:
            if "stale element reference" not in str(e) or attempt == tries - 1:
                raise
            time.sleep(0.1)


def typ(css, text):
    def act(e):
        wd("POST", S + f"/element/{e}/clear", {})
        wd("POST", S + f"/element/{e}/value", {"text": text})
    fresh(css, act)


def click(css):
    fresh(css, lambda e: wd("POST", S + f"/element/{e}/click", {}))


def shot(name):
    png = base64.b64decode(wd("GET", S + "/screenshot"))
    with open(os.path.join(CFG["shots"], name), "wb") as f:
        f.write(png)


def text():
    return js("return document.body.innerText")


def until(what, cond, timeout=20.0, step=0.05):
    """Polls `cond` until it holds (bounded). A WebDriver error while the page is
    changing under it (a navigation in flight, a region re-rendered by the live feed)
    counts as "not yet"; the last one is reported if time runs out."""
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            v = cond()
        except RuntimeError as e:
            v, last = None, e
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out waiting for: {what} (last WebDriver error: {last})"
                         f"\n--- page ---\n{text()[:3000]}")


def step(name, **facts):
    REPORT["steps"].append(dict(name=name, **facts))


def plugin_status(path="/clauses/c-flood-17/rainfall"):
    try:
        with urllib.request.urlopen(CFG["plugin_out"] + path, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def direct_status():
    """The data API's own sidecar, called with the plugin's dev SVID."""
    st = json.load(open(CFG["state"]))
    ctx = ssl.create_default_context(cafile=st["ca_bundle"])
    ctx.load_cert_chain(st["client_cert"], st["client_key"])
    try:
        with urllib.request.urlopen(st["data_api_inbound_url"] + "/clauses/c-flood-17/rainfall",
                                    context=ctx, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ConnectionError) as e:  # a revoked peer's handshake is cut
        return "closed: " + type(e).__name__


def nexusctl(*args):
    env = dict(os.environ, NEXUS_HOME=CFG["home"])
    args = [*args, "--up-state", CFG["state"]]
    out = subprocess.run([CFG["nexusctl"], *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def raw(method, path, headers, body=None):
    req = urllib.request.Request(BASE + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def confirm(expect, what):
    """Clicks Confirm on the current confirmation page and waits for `expect`. The
    gateway's SQLite store sometimes answers "database is locked" under heavy machine
    load (a store issue, not the console's: the console shows the gateway's message, as
    it should); then the same confirmation is submitted again, at most twice."""
    # The form posted to /confirm may still be loading (the page that asked holds the
    # same words): wait for the confirmation's own button.
    until("the confirmation form", lambda: js("return !!document.getElementById('confirm')"))
    page = js("return location.href")
    reason = js("var r=document.getElementById('reason'); return r ? r.value : ''")
    for attempt in range(3):
        click("#confirm")
        until(what, lambda: expect in text() or "The gateway refused" in text())
        if expect in text():
            return
        if "database is locked" not in text() or attempt == 2:
            raise AssertionError(f"{what}: {text()[:500]}")
        REPORT.setdefault("retried", []).append(what)
        go(page)
        until("the confirmation again", lambda: js("return !!document.getElementById('confirm')"))
        typ("#reason", reason)


PLUGIN = CFG["plugin"]
XSS = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
BASE = CFG["console"].split("/login")[0]
try:
    # 1. The printed URL signs in; the overview shows both sidecars of the stack.
    t0 = time.time()
    go(CFG["console"])
    until("overview with 2 sidecars", lambda: "in sync" in text() and
          js("return document.getElementById('sidecar-count').textContent") == "2")
    load_ms = js("var n=performance.getEntriesByType('navigation')[0]; return n.loadEventEnd - n.startTime")
    until("the live feed", lambda: js("return document.getElementById('conn').textContent") == "live")
    shot("overview.png")
    step("overview", load_ms=load_ms)

    # 2. Revoke the demo plugin from the UI, with a reason holding markup.
    assert plugin_status() == 200
    go(BASE + "/revocations")
    typ("#subject", PLUGIN)
    typ("#reason", XSS)
    click("form[action='/confirm'] button")
    until("the confirmation page", lambda: "Revoke" in text() and "Confirm" in text()
          and js("return !!document.getElementById('confirm')"))
    assert js("return document.getElementById('reason').value") == XSS
    shot("confirm-revoke.png")
    confirm("revoked " + PLUGIN, "the revoke result")
    step("revoked", result=js("return document.getElementById('result').textContent"))
    own, direct = plugin_status(), direct_status()
    assert own == 403 and (direct == 403 or str(direct).startswith("closed")), (own, direct)
    step("refused after revoke", plugin_sidecar=own, data_sidecar=direct)

    # 3. The revocation page shows the reason as text, runs no script, and the
    #    propagation (histogram and per-sidecar acknowledgements).
    go(BASE + "/revocations")
    until("the reason shown as text", lambda: XSS in text())
    until("the propagation histogram", lambda: js("return !!document.getElementById('histogram')"))
    assert js("return window.__pwned === undefined"), "a script in a reason ran"
    assert js("return document.querySelectorAll('#live img, #live script').length") == 0
    acks = js("return document.querySelectorAll('#propagations ul.acks li').length")
    step("escaped and propagated", per_sidecar_acks=acks)
    shot("revocations.png")

    # 4. Reinstate from the UI (the Reinstate… link, a reason required).
    click("a.act[href*='reinstate']")
    until("the reinstate confirmation", lambda: "Reinstate" in text()
          and js("return !!document.getElementById('confirm')"))
    click("#confirm")  # empty reason: the browser's own check keeps the form
    time.sleep(0.3)
    assert "Confirm" in text() and "reinstated" not in text()
    typ("#reason", "demo over")
    confirm("reinstated " + PLUGIN, "the reinstate result")
    assert plugin_status() == 200 and direct_status() == 200
    step("reinstated")

    # 5. A change made elsewhere (the CLI) appears in the open page, pushed: measured
    #    from the call's return to the region showing it.
    go(BASE + "/revocations")
    until("no revocation", lambda: js("return !!document.getElementById('no-revocations')"))
    until("live", lambda: js("return document.getElementById('conn').textContent") == "live")
    latencies = []
    for i in range(3):
        before = js("return window.nexusConsole.updates")
        nexusctl("revoke", PLUGIN, "--reason", f"cli {i}")
        t = time.time()
        until("the CLI revocation in the page", lambda: f"cli {i}" in js("return document.getElementById('live').innerText"), 10, 0.01)
        latencies.append(round((time.time() - t) * 1000))
        nexusctl("reinstate", PLUGIN)
        until("its reinstatement in the page", lambda: js("return !!document.getElementById('no-revocations')"), 10, 0.01)
        assert js("return window.nexusConsole.updates") > before
    step("gateway change to page", latencies_ms=latencies,
         render_ms=js("return window.nexusConsole.lastRenderMs"))

    # 6. Open an execution from the UI: the plugin may then read c-flood-18.
    assert plugin_status("/clauses/c-flood-18/rainfall") == 403
    go(BASE + "/executions")
    typ("#plugin", PLUGIN)
    typ("#clause", "c-flood-18")
    typ("#reason", "quarterly run")
    click("form[action='/confirm'] button")
    until("the open confirmation", lambda: "Open an execution" in text()
          and js("return !!document.getElementById('confirm')"))
    confirm("opened execution", "the open result")
    assert plugin_status("/clauses/c-flood-18/rainfall") == 200
    go(BASE + "/executions")
    until("the execution listed", lambda: "c-flood-18" in text())
    until("the timeline", lambda: js("return !!document.getElementById('timeline')"))
    shot("executions.png")
    step("execution opened")
    # Its records (the plugin's request above, from both sidecars) with the chain check;
    # sidecars ship records in batches, so reload until they arrived.
    link = js("var a=[...document.querySelectorAll('#open-executions a')].find(a=>a.textContent=='Records'&&a.closest('tr').innerText.includes('c-flood-18')); return a && a.href")
    def records_in():
        go(link)
        return "c-flood-18" in text() and "every hash recomputes" in text()
    until("the execution's records", records_in, 30, 1.0)
    shot("records.png")
    step("records", chain=js("return document.getElementById('chain').textContent"))

    # 7. An action the gateway refuses shows the gateway's reason.
    go(BASE + "/confirm?action=revoke&subject=not-a-spiffe-id&reason=x")
    click("#confirm")
    until("the gateway's refusal", lambda: "The gateway refused" in text())
    step("gateway refusal", message=js("return document.getElementById('refused').textContent"))

    # 8. Forged requests: the session cookie is HttpOnly and SameSite=Strict, so a
    #    script elsewhere has none; here we even hold it and still fail without the
    #    form token, with a foreign Origin, or under a foreign Host.
    cookie = "nexus_console=" + CFG["console"].split("token=")[1]
    go(BASE + "/")
    until("overview", lambda: js("return !!document.querySelector('meta[name=nexus-csrf]')"))
    csrf = js("return document.querySelector('meta[name=nexus-csrf]').content")
    form = f"action=revoke&subject={PLUGIN}&reason=forged".encode()
    ct = "application/x-www-form-urlencoded"
    forged = {
        "no_token": raw("POST", "/action", {"cookie": cookie, "content-type": ct}, form)[0],
        "foreign_origin": raw("POST", "/action", {"cookie": cookie, "content-type": ct,
                              "origin": "http://evil.example"}, form + b"&csrf=" + csrf.encode())[0],
        "foreign_host": raw("GET", "/", {"cookie": cookie, "host": "evil.example:80"})[0],
        "no_cookie": raw("GET", "/", {})[0],
        "wrong_login": raw("GET", "/login?token=00", {})[0],
    }
    assert plugin_status() == 200, "a forged request revoked the plugin"
    step("forged requests refused", **forged)

    # 9. Policies: the Rego revision each sidecar reports, pushed live when the policy
    #    folder changes; a reload that fails shows with its reason while the previous
    #    revision keeps serving; fixed, it clears.
    def policy_rows():
        return js("return [...document.querySelectorAll('#policy-revisions tbody tr')]"
                  ".map(r => [...r.cells].map(c => c.innerText))")
    go(BASE + "/policies")
    until("both sidecars' policy revisions", lambda: len(policy_rows()) == 2 and
          all(r[0].startswith("sha256:") and r[4] == "ok" for r in policy_rows()))
    first = {r[0] for r in policy_rows()}
    assert len(first) == 1, policy_rows()
    first = first.pop()
    st = json.load(open(CFG["state"]))
    authz = os.path.join(st["policy_dir"], "nexus", "authz", "authz.rego")
    with open(authz, "a") as f:
        f.write("\n# edited by the console test\n")
    t = time.time()
    until("the new revision in the open page", lambda: all(
        r[0].startswith("sha256:") and r[0] != first for r in policy_rows()) and len(policy_rows()) == 2, 30)
    policy_ms = round((time.time() - t) * 1000)
    second = policy_rows()[0][0]
    status = json.loads(nexusctl("status", "-o", "json"))
    cli = sorted(x["policy"]["revision"] for x in status["sidecars"])
    assert cli == [second, second], (cli, second)
    broken = os.path.join(st["policy_dir"], "nexus", "authz", "console_broken.rego")
    with open(broken, "w") as f:
        f.write("package nexus.authz\n\nthis is not <b>rego</b>\n")
    until("the failed reload", lambda: all("failed" in r[4] and "console_broken.rego" in r[4]
                                           for r in policy_rows()), 30)
    assert all(r[0] == second for r in policy_rows()), policy_rows()
    assert js("return document.querySelectorAll('#policy-revisions b').length") == 0, "markup in a reload error rendered"
    shot("policies.png")
    failed = policy_rows()[0][4]
    os.remove(broken)
    until("the reload ok again", lambda: all(r[4] == "ok" and r[0] == second for r in policy_rows()), 30)
    assert plugin_status() == 200
    step("policy revisions", first=first, second=second, cli=cli, change_to_page_ms=policy_ms,
         failed=failed[:200])

    # 10. Registry: the demo plugin's version, digest, state and who certified it.
    go(BASE + "/registry")
    until("the demo plugin", lambda: "flood-model" in text() and "1.0.0" in text())
    row = js("var r=document.querySelector('tr[data-version=\"1.0.0\"]'); return r && [...r.cells].map(c => c.innerText)")
    shot("registry.png")
    step("registry", row=row)

    # 11. Workloads: the demo plugin's declared budget, its request sparkline (the
    #     plugin's requests above, from its sidecar's shipped records).
    go(BASE + "/workloads")
    plugin_row = "document.querySelector('tr[data-workload=\"" + PLUGIN + "\"]')"
    until("the plugin's row", lambda: js("return !!" + plugin_row))
    until("requests counted", lambda: js("var t=" + plugin_row + ".querySelector('svg.requests title');"
                                         "return t && !t.textContent.startsWith('0 ')"), 30)
    cells = js("return [..." + plugin_row + ".cells].map(c => c.innerText)")
    spark = js("return " + plugin_row + ".querySelector('svg.requests title').textContent")
    shot("workloads.png")
    step("workloads", budgets=cells[4], baseline=cells[5], requests=spark)

    # 12. A signal and its evidence: POSTs (a method the policy denies) from the plugin,
    #     slowly enough for no rate spike, make its own sidecar report a denial burst;
    #     its page lists the records the signal cites.
    for _ in range(24):
        req = urllib.request.Request(CFG["plugin_out"] + "/clauses/c-flood-17/rainfall", data=b"x", method="POST")
        try:
            urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError:
            pass
        time.sleep(0.1)
    go(BASE + "/signals")
    until("the denial burst", lambda: "denial_burst" in text(), 30)
    href = js("var a=[...document.querySelectorAll('#signals tr')].find(r=>r.innerText.includes('denial_burst'))"
              ".querySelector('a.evidence'); return a.href")
    def evidence():
        go(href)
        # Sidecars ship records in batches: wait until every cited one arrived.
        return "records from the reporter found, 0 missing" in text() and \
            js("return document.querySelectorAll('#evidence tbody tr').length") > 0
    until("every evidence record", evidence, 30, 1.0)
    shown = js("return [...document.querySelectorAll('#evidence code.decision-id')].map(c => c.textContent)")
    signal_id = js("return document.getElementById('signal-id').textContent")
    cli = json.loads(nexusctl("signals", "--show", signal_id, "-o", "json"))
    cli_ids = [r["decision_id"] for r in cli["records"]]
    assert shown == cli_ids and shown, (shown, cli_ids)
    shot("signal.png")
    step("signal evidence", signal=signal_id, decision_ids=shown,
         summary=js("return document.getElementById('evidence-summary').textContent"))
    REPORT["ok"] = True
except Exception as e:  # the Rust test prints the report and fails on it
    REPORT["ok"] = False
    REPORT["error"] = f"{type(e).__name__}: {e}"
    try:
        shot("failure.png")
    except Exception:
        pass
finally:
    try:
        wd("DELETE", S)
    except Exception:
        pass
print(json.dumps(REPORT))
