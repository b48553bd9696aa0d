"""A minimal docker-registry token server for tests: basic auth in, an
RS256 JWT (x5c header) out, signed with the openssl CLI. Stdlib only."""
import base64, json, os, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import urlparse, parse_qs

PORT, KEY, CERT, USER, PASSWORD, ISSUER = sys.argv[1:7]

def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

def der_cert():
    pem = open(CERT).read()
    body = "".join(l for l in pem.splitlines() if "CERTIFICATE" not in l)
    return body

def sign(message):
    return subprocess.run(["openssl", "dgst", "-sha256", "-sign", KEY], input=message,
                          capture_output=True, check=True).stdout

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        q = parse_qs(urlparse(self.path).query)
        auth = self.headers.get("Authorization", "")
        want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if auth != want:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="vessel-test-token"')
            self.end_headers()
            return
        access = []
        for scope in q.get("scope", []):
            kind, name, actions = scope.split(":", 2) if scope.count(":") >= 2 else (scope, "", "")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": USER, "aud": q.get("service", [""])[0], "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": b64(os.urandom(12)), "access": access}
        header = {"typ": "JWT", "alg": "RS256", "x5c": [der_cert()]}
        signing = (b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())).encode()
        token = signing.decode() + "." + b64(sign(signing))
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

HTTPServer(("127.0.0.1", int(PORT)), Handler).serve_forever()
