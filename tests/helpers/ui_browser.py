"""Drives `cxrfed ui` in headless Chromium (Debian's chromium + chromedriver, Selenium from
PyPI) the way a person would, and checks the console's browser-side security with plain HTTP
requests. Run by tests/ui.rs:

    ui_browser.py SCENARIO CONFIG.json

SCENARIO is `admin` (a site admin's console of one node), `researcher` (a researcher's console
of the same node) or `study` (a study admin's console of the coordinator of three sites).
Screenshots go to CONFIG["shots"]; axe-core (npm, tests/ui) checks every page visited.
Prints one JSON line of findings and exits non-zero on the first failed check.
"""

import http.client
import http.server
import json
import statistics
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[2]
AXE = ROOT / "tests" / "ui" / "node_modules" / "axe-core" / "axe.min.js"

findings = {}
CURRENT = []


def check(condition, message):
    if not condition:
        print(json.dumps(findings), flush=True)
        for ui in CURRENT:
            ui.shot("failed")
        raise SystemExit(f"FAILED: {message}")


class Console:
    def __init__(self, url, shots):
        self.login_url = url
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.base = f"{parts.scheme}://{parts.netloc}"
        self.shots = Path(shots)
        self.shots.mkdir(parents=True, exist_ok=True)
        self.axe_source = AXE.read_text()
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1000", "--lang=en-US"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # An explicit driver: Selenium Manager would try the network.
        self.driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        self.driver.set_page_load_timeout(60)
        self.wait = WebDriverWait(self.driver, 60)
        self.violations = {}
        CURRENT.append(self)

    # -- plain HTTP (what a script or an attacker without the cookie does) --
    def http(self, method, path, headers=None, body=None):
        c = http.client.HTTPConnection(self.host, self.port, timeout=60)
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, dict(r.getheaders()), data

    def cookie_header(self):
        cookie = self.driver.get_cookie("cxrfed_session")
        return f"cxrfed_session={cookie['value']}"

    def csrf(self):
        attr = self.driver.find_element(By.TAG_NAME, "body").get_attribute("hx-headers")
        return json.loads(attr)["X-CSRF-Token"]

    # -- the browser --
    def get(self, path):
        self.driver.get(self.base + path)

    def shot(self, name):
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))

    def axe(self, name):
        """axe-core on the current page (WCAG 2 A and AA rules)."""
        self.driver.execute_script(self.axe_source)
        result = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa']}})"
            ".then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.length,"
            " target: v.nodes.slice(0, 3).map(n => n.target.join(' '))}))))"
            ".catch(e => done([{id: 'axe-error', impact: String(e), nodes: 0}]));"
        )
        if result:
            self.violations[name] = result
        return result

    def csp_errors(self):
        logs = self.driver.get_log("browser")
        return [l["message"] for l in logs if "Content Security Policy" in l["message"]]

    def text(self):
        return self.driver.find_element(By.TAG_NAME, "body").text

    def until(self, condition, what, seconds=60):
        try:
            return WebDriverWait(self.driver, seconds, ignored_exceptions=[
                StaleElementReferenceException, NoSuchElementException]).until(condition)
        except Exception as e:
            check(False, f"waited {seconds} s for {what} ({type(e).__name__}); page: {self.text()[:1500]}")

    def wait_css(self, css, seconds=60):
        return self.until(EC.presence_of_element_located((By.CSS_SELECTOR, css)), css, seconds)

    def wait_text(self, css, needle, seconds=60):
        self.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, css), needle), f"{needle!r} in {css}", seconds)
        return self.driver.find_element(By.CSS_SELECTOR, css).text

    def quit(self):
        self.driver.quit()


def login_security(ui):
    """No token, wrong tokens, and the one-time token."""
    status, _, _ = ui.http("GET", "/")
    check(status == 401, f"no session: {status}")
    status, _, _ = ui.http("GET", "/records")
    check(status == 401, f"no session on a page: {status}")
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(ui.login_url).query)["token"][0]
    wrong_prefix = token[:-1] + ("0" if token[-1] != "0" else "1")
    wrong_first = ("0" if token[0] != "0" else "1") + token[1:]
    for bad in ["", "x", wrong_prefix, wrong_first]:
        status, _, _ = ui.http("GET", "/login?token=" + bad)
        check(status == 401, f"wrong token {bad!r}: {status}")
    # How long a refusal takes for a near miss (all but the last character right) and a far
    # one (the first character wrong): reported, never asserted (timing belongs in benches).
    def median_ms(candidate):
        samples = []
        for _ in range(60):
            t = time.perf_counter()
            ui.http("GET", "/login?token=" + candidate)
            samples.append((time.perf_counter() - t) * 1000)
        return statistics.median(samples)
    findings["wrong_token_median_ms"] = {
        "last_char_wrong": round(median_ms(wrong_prefix), 3),
        "first_char_wrong": round(median_ms(wrong_first), 3),
    }
    return token


def open_console(ui, token):
    ui.driver.get(ui.login_url)
    ui.wait_css("main h1")
    check(urllib.parse.urlsplit(ui.driver.current_url).query == "", "the token left the address bar")
    check("Research use only" in ui.text(), "pages say research use only")
    cookie = ui.driver.get_cookie("cxrfed_session")
    check(cookie is not None and cookie["httpOnly"], f"HttpOnly session cookie: {cookie}")
    check(cookie["sameSite"] == "Strict", f"SameSite=Strict: {cookie}")
    status, _, _ = ui.http("GET", "/login?token=" + token)
    check(status == 401, f"the login token works once: {status}")
    status, headers, _ = ui.http("GET", "/", {"Cookie": ui.cookie_header()})
    check(status in (200, 303), f"the session opens the console: {status}")
    csp = headers.get("content-security-policy", "")
    check("script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp,
          f"strict CSP: {csp}")


def csrf_checks(ui, path, body):
    """A state-changing request needs the session's CSRF token and this origin."""
    cookie = ui.cookie_header()
    form = {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"}
    status, _, _ = ui.http("POST", path, form, body)
    check(status == 403, f"POST {path} without a CSRF token: {status}")
    status, _, _ = ui.http("POST", path, {**form, "X-CSRF-Token": "0" * 64}, body)
    check(status == 403, f"POST {path} with a wrong CSRF token: {status}")
    status, _, _ = ui.http("POST", path, {**form, "X-CSRF-Token": ui.csrf(),
                                          "Origin": "http://evil.example"}, body)
    check(status == 403, f"POST {path} from another origin: {status}")
    status, _, _ = ui.http("POST", path, {**form, "X-CSRF-Token": ui.csrf(),
                                          "Origin": ui.base}, body)
    return status


def forged_cross_site_post(ui, path, fields):
    """A page on another site (localhost vs 127.0.0.1, another port) that auto-submits a form to
    the console, opened in the same logged-in browser."""
    inputs = "".join(f'<input name="{k}" value="{v}">' for k, v in fields.items())
    page = (f'<html><body><form id="f" method="post" action="{ui.base}{path}">{inputs}</form>'
            '<script>document.getElementById("f").submit()</script></body></html>').encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ui.driver.get(f"http://localhost:{server.server_port}/")
        ui.until(lambda d: d.current_url.startswith(ui.base), "the forged form to land")
        time.sleep(0.5)
        body = ui.text()
        check(body.startswith("401") or body.startswith("403"), f"the forged POST was refused: {body[:200]}")
        findings["forged_post"] = body.splitlines()[0]
    finally:
        server.shutdown()


def scenario_admin(config):
    ui = Console(config["url"], config["shots"])
    try:
        token = login_security(ui)
        open_console(ui, token)
        ui.shot("01-status")
        check("Records" in ui.text(), "status shows the record count")
        status = ui.driver.find_element(By.ID, "status")
        check("done" in status.text and status.find_elements(By.TAG_NAME, "progress"),
              f"status lists the ingest job with its progress: {status.text[:400]}")
        check(status.get_attribute("hx-trigger") == "every 2s", "status refreshes itself")
        ui.axe("status")

        # Keyboard: the first Tab reaches the skip link, then the navigation.
        body = ui.driver.find_element(By.TAG_NAME, "body")
        body.send_keys(Keys.TAB)
        focused = ui.driver.switch_to.active_element
        check(focused.text == "Skip to content", f"first tab stop: {focused.text!r}")
        focused.send_keys(Keys.TAB)
        focused = ui.driver.switch_to.active_element
        check(focused.tag_name == "a" and focused.text == "Status", f"second tab stop: {focused.text!r}")

        # Upload RG1 (DICOM) and a PNG; see their records.
        ui.get("/upload")
        ui.axe("upload")
        ui.driver.find_element(By.ID, "files").send_keys("\n".join(config["uploads"]))
        ui.driver.find_element(By.CSS_SELECTOR, "#upload button[type=submit]").click()
        ui.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-testid=record-link]")) == len(config["uploads"]), "the uploads' records")
        ui.shot("02-uploaded")
        links = ui.driver.find_elements(By.CSS_SELECTOR, "[data-testid=record-link]")
        record_ids = [l.text for l in links]
        findings["uploaded"] = record_ids
        links[0].click()
        ui.wait_css("[data-testid=findings]")
        check("costophrenic_angle" in ui.text(), "the record shows its findings")
        loaded = ui.driver.execute_script(
            "const i = document.querySelector('figure.input img'); return i.complete && i.naturalWidth;")
        check(loaded and loaded > 0, f"the model input thumbnail loads ({loaded})")

        # Ask in Chinese; the costophrenic answer is appended.
        q = ui.driver.find_element(By.ID, "question")
        q.send_keys("左侧肋膈角是否变钝?")
        q.send_keys(Keys.ENTER)
        answer = ui.wait_text("[data-testid=answer]", "costophrenic")
        findings["answer"] = answer
        ui.wait_text("#answers", "costophrenic_angle")
        ui.shot("03-record-asked")
        ui.axe("record")

        # A crosstab with its chart.
        ui.get("/stats?" + urllib.parse.urlencode({"q": "crosstab image_quality, analysis_confidence"}))
        ui.wait_css("#chart svg")
        check("crosstab over" in ui.text(), "the crosstab ran")
        rects = ui.driver.find_elements(By.CSS_SELECTOR, "#chart svg rect")
        check(len(rects) > 2, f"the chart has bars ({len(rects)})")
        ui.shot("04-crosstab")
        ui.axe("stats")
        # A query error is the node's INVALID_ARGUMENT, shown.
        ui.get("/stats?" + urllib.parse.urlencode({"q": "crosstab no_such_field"}))
        check("InvalidArgument" in ui.text(), "a bad query shows the node's error")

        # A custom field, then the keyboard labelling view.
        ui.get("/fields")
        form = ui.driver.find_element(By.CSS_SELECTOR, "form[hx-post='/fields']")
        form.find_element(By.NAME, "name").send_keys("chest_tube")
        form.find_element(By.NAME, "type").send_keys("bool")
        form.find_element(By.NAME, "description").send_keys("a chest drain is visible")
        form.find_element(By.CSS_SELECTOR, "button").click()
        ui.wait_text("#define-result", "Defined")
        ui.axe("fields")
        ui.get("/label?field=chest_tube")
        ui.wait_css("form.labelling")
        first = ui.driver.find_element(By.CSS_SELECTOR, "form.labelling input[name=record_id]").get_attribute("value")
        ui.shot("05-labelling")
        ui.axe("label")
        ui.driver.switch_to.active_element.send_keys("1")
        ui.driver.switch_to.active_element.send_keys(Keys.ENTER)
        ui.until(lambda d: first not in d.find_element(By.ID, "labeller").get_attribute("innerHTML"), "the next image to label")
        ui.get(f"/records/{first}")
        check("chest_tube" in ui.text(), "the label shows on the record")

        # The audit chain verifies; the export downloads.
        ui.get("/audit")
        ui.driver.find_element(By.CSS_SELECTOR, "button[hx-post='/audit/verify']").click()
        verdict = ui.wait_text("[data-testid=verify]", "verifies")
        findings["audit"] = verdict
        ui.shot("06-audit")
        ui.axe("audit")
        status, headers, data = ui.http("GET", "/export/download?format=csv", {"Cookie": ui.cookie_header()})
        check(status == 200 and data.startswith(b"record_id"), f"export: {status} {data[:60]!r}")
        check("attachment" in headers.get("content-disposition", ""), "export is a download")
        ui.get("/privacy")
        ui.axe("privacy")

        # CSRF and a forged cross-site POST (the budget must not change).
        status = csrf_checks(ui, "/privacy/budget", "identity=mallory&epsilon=99")
        check(status == 200, f"a same-origin POST with the token works: {status}")
        forged_cross_site_post(ui, "/privacy/budget", {"identity": "eve", "epsilon": "99"})
        ui.get("/privacy")
        check("eve" not in ui.text(), "the forged POST changed nothing")

        csp = ui.csp_errors()
        check(not csp, f"no CSP violations: {csp}")
        findings["axe_violations"] = ui.violations
        check(not ui.violations, f"axe-core: {ui.violations}")
    finally:
        ui.quit()


def scenario_researcher(config):
    ui = Console(config["url"], config["shots"])
    try:
        token = login_security(ui)
        open_console(ui, token)
        # The researcher lands on DP statistics, with the budget shown before spending.
        ui.wait_css("[data-testid=budget]")
        before = ui.driver.find_element(By.CSS_SELECTOR, "[data-testid=budget]").text
        findings["budget_before"] = before
        ui.shot("11-researcher-dp")
        ui.axe("dp")
        textarea = ui.driver.find_element(By.ID, "dp-q")
        textarea.clear()
        textarea.send_keys("histogram image_quality")
        ui.driver.find_element(By.CSS_SELECTOR, "form[hx-post='/dp'] button").click()
        released = ui.wait_text("[data-testid=dp-release]", "charged")
        findings["release"] = released
        ui.wait_css("#dp-result table")
        ui.until(lambda d: d.find_element(By.CSS_SELECTOR, "[data-testid=budget]").text != before, "the budget to update")
        findings["budget_after"] = ui.driver.find_element(By.CSS_SELECTOR, "[data-testid=budget]").text
        ui.shot("12-researcher-released")
        ui.axe("dp-released")
        # Nothing exact is reachable: the node refuses, the console says so.
        for path in ["/stats?q=count", "/records", "/export/download?format=csv", "/audit"]:
            ui.get(path)
            check("Refused" in ui.text(),
                  f"{path} refused for a researcher: {ui.text()[:300]}")
            status, _, _ = ui.http("GET", path, {"Cookie": ui.cookie_header()})
            check(status == 403, f"{path} as a researcher: HTTP {status}")
        ui.shot("13-researcher-refused")
        # An exhausted budget is the node's RESOURCE_EXHAUSTED, shown, and nothing released.
        ui.get("/dp")
        eps = ui.driver.find_element(By.NAME, "epsilon")
        eps.clear()
        eps.send_keys("1000")
        ui.driver.find_element(By.CSS_SELECTOR, "form[hx-post='/dp'] button").click()
        refused = ui.wait_text("#dp-result", "Refused")
        findings["exhausted"] = refused
        check(not ui.csp_errors(), "no CSP violations")
        findings["axe_violations"] = ui.violations
        check(not ui.violations, f"axe-core: {ui.violations}")
    finally:
        ui.quit()


def scenario_study(config):
    ui = Console(config["url"], config["shots"])
    try:
        token = login_security(ui)
        open_console(ui, token)
        ui.until(lambda d: d.find_element(By.ID, "sites").text.count("connected") >= 3, "three connected sites")
        check(ui.text().count("not connected") == 0, "all three sites are connected")
        ui.shot("21-sites")
        ui.axe("sites")
        # Start a job from the form; the console signs it and goes to the job's page.
        ui.get("/jobs")
        ui.axe("jobs")
        spec = ui.driver.find_element(By.ID, "spec")
        spec.clear()
        ui.driver.execute_script("arguments[0].value = arguments[1];", spec, config["job"])
        ui.driver.find_element(By.CSS_SELECTOR, "form[hx-post='/jobs'] button").click()
        ui.until(lambda d: "/jobs/" in d.current_url, "the job page")
        ui.wait_css("[data-testid=rounds]")
        # Watch the rounds appear live (the page polls) until the job completes.
        ui.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid=rounds] tbody tr"), "a round", 600)
        ui.wait_css("[data-testid=round-charts] svg")
        ui.shot("22-job-running")
        ui.until(lambda d: d.find_element(By.CSS_SELECTOR, "[data-testid=job-state]").text != "running", "the job to end", 900)
        state = ui.driver.find_element(By.CSS_SELECTOR, "[data-testid=job-state]").text
        rows = ui.driver.find_elements(By.CSS_SELECTOR, "[data-testid=rounds] tbody tr")
        findings["job"] = {"state": state, "round_rows": len(rows)}
        check(state == "completed", f"the job completed: {state}")
        ui.shot("23-job-done")
        ui.axe("job")
        # The registry shows the lineage; promote the job's latest model.
        ui.get("/models")
        ui.wait_css("[data-testid=lineage]")
        boxes = ui.driver.find_elements(By.CSS_SELECTOR, "[data-testid=lineage] rect")
        lines = ui.driver.find_elements(By.CSS_SELECTOR, "[data-testid=lineage] line")
        findings["lineage"] = {"versions": len(boxes), "edges": len(lines)}
        check(len(boxes) >= 2 and len(lines) >= 1, f"a lineage graph: {findings['lineage']}")
        ui.shot("24-registry")
        ui.axe("registry")
        buttons = ui.driver.find_elements(By.CSS_SELECTOR, "button[hx-post$='/promote']")
        ui.driver.execute_script("window.confirm = () => true;")
        buttons[-1].click()
        promoted = ui.wait_text("[data-testid=promoted]", "promoted")
        findings["promoted"] = promoted
        ui.shot("25-promoted")
        check(not ui.csp_errors(), "no CSP violations")
        findings["axe_violations"] = ui.violations
        check(not ui.violations, f"axe-core: {ui.violations}")
    finally:
        ui.quit()


def scenario_federated(config):
    """A researcher's console of the coordinator: a signed federated DP query."""
    ui = Console(config["url"], config["shots"])
    try:
        token = login_security(ui)
        open_console(ui, token)
        nav = ui.driver.find_element(By.CSS_SELECTOR, "nav").text
        check("Federated query" in nav and "Jobs" not in nav, f"a researcher's navigation: {nav!r}")
        ui.get("/query")
        ui.axe("query")
        area = ui.driver.find_element(By.ID, "fq")
        area.clear()
        area.send_keys("histogram image_quality")
        ui.driver.find_element(By.CSS_SELECTOR, "form[hx-post='/query'] button").click()
        pooled = ui.wait_text("[data-testid=federated-result]", "pooled from")
        findings["pooled"] = pooled
        check("pooled from 3 site(s)" in pooled, pooled)
        ui.wait_css("#query-result svg")
        ui.shot("31-federated-query")
        ui.axe("query-result")
        # A researcher cannot sign orders: the console refuses before anything is sent.
        status, _, body = ui.http("POST", "/models/tiny-phantom-v1/promote",
                                  {"Cookie": ui.cookie_header(), "X-CSRF-Token": ui.csrf(), "Origin": ui.base})
        check(status == 400 and b"study admin" in body, f"a researcher's promotion: {status} {body[:200]!r}")
        check(not ui.csp_errors(), "no CSP violations")
        findings["axe_violations"] = ui.violations
        check(not ui.violations, f"axe-core: {ui.violations}")
    finally:
        ui.quit()


def main():
    scenario, config = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    {"admin": scenario_admin, "researcher": scenario_researcher, "study": scenario_study,
     "federated": scenario_federated}[scenario](config)
    print(json.dumps(findings), flush=True)


if __name__ == "__main__":
    main()
