// A Java (JSSE) TLS server for tests/test_upstream_outcome.py: a TLS stack
// that is not OpenSSL, to see which alerts it sends where OpenSSL servers
// send theirs. One listener per configuration below on a kernel-chosen
// loopback port, printed as "PORTS name=port ..." once all listen; each
// connection: handshake, read a request, answer "ok", close. Runs until killed.
//
// Usage: java TlsServer.java CERT.pem KEY.pem CA.pem

import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetAddress;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyFactory;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.security.spec.PKCS8EncodedKeySpec;
import java.util.Base64;
import java.util.LinkedHashMap;
import java.util.Map;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLServerSocket;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManagerFactory;

public class TlsServer {
    record Setup(String[] protocols, boolean needClientAuth, String[] alpn, String[] suites) {}

    public static void main(String[] args) throws Exception {
        char[] secret = "test".toCharArray();
        CertificateFactory x509 = CertificateFactory.getInstance("X.509");
        Certificate cert;
        Certificate ca;
        try (InputStream in = Files.newInputStream(Path.of(args[0]))) {
            cert = x509.generateCertificate(in);
        }
        try (InputStream in = Files.newInputStream(Path.of(args[2]))) {
            ca = x509.generateCertificate(in);
        }
        String pem = Files.readString(Path.of(args[1]), StandardCharsets.US_ASCII);
        byte[] der = Base64.getMimeDecoder().decode(
            pem.replaceAll("-----[A-Z ]+-----", ""));
        PrivateKey key = KeyFactory.getInstance("EC").generatePrivate(new PKCS8EncodedKeySpec(der));

        KeyStore keys = KeyStore.getInstance("PKCS12");
        keys.load(null, null);
        keys.setKeyEntry("server", key, secret, new Certificate[] {cert});
        KeyManagerFactory kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
        kmf.init(keys, secret);
        KeyStore trust = KeyStore.getInstance("PKCS12");
        trust.load(null, null);
        trust.setCertificateEntry("ca", ca);
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);
        SSLContext context = SSLContext.getInstance("TLS");
        context.init(kmf.getKeyManagers(), tmf.getTrustManagers(), null);

        String[] both = {"TLSv1.3", "TLSv1.2"};
        Map<String, Setup> setups = new LinkedHashMap<>();
        setups.put("ok", new Setup(both, false, null, null));
        setups.put("need12", new Setup(new String[] {"TLSv1.2"}, true, null, null));
        setups.put("need13", new Setup(new String[] {"TLSv1.3"}, true, null, null));
        setups.put("tls13", new Setup(new String[] {"TLSv1.3"}, false, null, null));
        setups.put("alpn", new Setup(both, false, new String[] {"h2"}, null));
        setups.put("ciphers12", new Setup(new String[] {"TLSv1.2"}, false, null,
            new String[] {"TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA"}));

        StringBuilder ports = new StringBuilder("PORTS");
        for (Map.Entry<String, Setup> entry : setups.entrySet()) {
            Setup setup = entry.getValue();
            SSLServerSocket listener = (SSLServerSocket) context.getServerSocketFactory()
                .createServerSocket(0, 16, InetAddress.getLoopbackAddress());
            SSLParameters params = listener.getSSLParameters();
            params.setProtocols(setup.protocols());
            params.setNeedClientAuth(setup.needClientAuth());
            if (setup.alpn() != null) {
                params.setApplicationProtocols(setup.alpn());
            }
            if (setup.suites() != null) {
                params.setCipherSuites(setup.suites());
            }
            listener.setSSLParameters(params);
            ports.append(' ').append(entry.getKey()).append('=').append(listener.getLocalPort());
            Thread thread = new Thread(() -> serve(listener));
            thread.setDaemon(true);
            thread.start();
        }
        System.out.println(ports);
        System.out.flush();
        Thread.currentThread().join();
    }

    static void serve(SSLServerSocket listener) {
        while (true) {
            try (SSLSocket conn = (SSLSocket) listener.accept()) {
                conn.setSoTimeout(20_000);
                conn.startHandshake();
                InputStream in = conn.getInputStream();
                OutputStream out = conn.getOutputStream();
                if (in.read(new byte[4096]) > 0) {
                    out.write("ok".getBytes(StandardCharsets.US_ASCII));
                    out.flush();
                }
            } catch (Exception exc) {
                System.err.println(listener.getLocalPort() + ": " + exc);
            }
        }
    }
}
