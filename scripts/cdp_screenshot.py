#!/usr/bin/env python3
"""Screenshot of a page once it says it is ready, over the Chrome DevTools Protocol (stdlib only).

    cdp_screenshot.py CHROMIUM URL OUT.png [TIMEOUT_S]

Starts headless CHROMIUM, opens URL at 1280x860, waits until `document.body.dataset.state` is
`done`, `paused` or `error` (the mmada-infer serve page sets it when a generation ends or its
stream is paused with ?pause=K), and writes the viewport as a PNG. Used by serve_screenshot.sh.
"""
import base64, json, os, socket, struct, subprocess, sys, tempfile, time, urllib.request

chromium, url, out = sys.argv[1:4]
timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 120
profile = tempfile.mkdtemp()
proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                         "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    port_file = os.path.join(profile, "DevToolsActivePort")
    for _ in range(300):
        if os.path.exists(port_file) and open(port_file).read().strip():
            break
        time.sleep(0.1)
    port = int(open(port_file).read().split()[0])
    req = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
    ws_url = json.load(urllib.request.urlopen(req))["webSocketDebuggerUrl"]
    path = ws_url.split(f":{port}", 1)[1]
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(4096)
    buf = buf.split(b"\r\n\r\n", 1)[1]

    def recv_exact(n):
        global buf
        while len(buf) < n:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise EOFError("devtools closed the connection")
            buf += chunk
        data, buf = buf[:n], buf[n:]
        return data

    def recv_msg():
        payload = b""
        while True:
            b0, b1 = recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", recv_exact(8))[0]
            payload += recv_exact(n)
            if b0 & 0x80:
                return json.loads(payload)

    next_id = [0]

    def call(method, **params):
        next_id[0] += 1
        data = json.dumps({"id": next_id[0], "method": method, "params": params}).encode()
        mask = os.urandom(4)
        head = bytes([0x81])
        n = len(data)
        head += bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536
                                                   else bytes([0x80 | 127]) + struct.pack(">Q", n))
        sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
        while True:
            m = recv_msg()
            if m.get("id") == next_id[0]:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]

    call("Emulation.setDeviceMetricsOverride", width=1280, height=860, deviceScaleFactor=1, mobile=False)
    call("Page.navigate", url=url)
    t0, state = time.time(), None
    while time.time() - t0 < timeout:
        r = call("Runtime.evaluate", expression="document.body && document.body.dataset.state || ''",
                 returnByValue=True)
        state = r["result"].get("value")
        if state in ("done", "paused", "error"):
            break
        time.sleep(0.2)
    else:
        sys.exit(f"the page did not finish within {timeout} s (state {state!r})")
    time.sleep(0.3)
    png = call("Page.captureScreenshot", format="png")["data"]
    open(out, "wb").write(base64.b64decode(png))
    print(f"wrote {out} (page state: {state})")
finally:
    proc.terminate()
    proc.wait()
