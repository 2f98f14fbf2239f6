# OpenSSL declarations (libssl/libcrypto 1.1.1 or 3.x), all callable without
# the GIL. Only netpoll/_core/tls.pyx and the benchmark load generator use
# them, and only they link against libssl; see tls.pyx for why the library
# must be the very one Python's ssl module loaded.

from libc.stdint cimport uint64_t

cdef extern from "<openssl/ssl.h>" nogil:
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct SSL:
        pass
    ctypedef struct SSL_CIPHER:
        pass
    ctypedef struct SSL_METHOD:
        pass
    ctypedef struct BIO:
        pass
    ctypedef struct BIO_METHOD:
        pass
    ctypedef struct X509:
        pass
    ctypedef struct X509_VERIFY_PARAM:
        pass

    # SSL_get_error() results
    int SSL_ERROR_NONE, SSL_ERROR_SSL, SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE
    int SSL_ERROR_SYSCALL, SSL_ERROR_ZERO_RETURN

    long SSL_MODE_ENABLE_PARTIAL_WRITE, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
    long SSL_MODE_AUTO_RETRY
    int SSL_VERIFY_NONE, SSL_VERIFY_PEER, SSL_VERIFY_FAIL_IF_NO_PEER_CERT
    int SSL_SENT_SHUTDOWN, SSL_RECEIVED_SHUTDOWN

    const SSL_METHOD *TLS_client_method()
    const SSL_METHOD *TLS_server_method()
    SSL_CTX *SSL_CTX_new(const SSL_METHOD *meth)
    int SSL_CTX_up_ref(SSL_CTX *ctx)
    void SSL_CTX_free(SSL_CTX *ctx)
    int SSL_CTX_get_verify_mode(const SSL_CTX *ctx)
    void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, void *cb)

    SSL *SSL_new(SSL_CTX *ctx)
    void SSL_free(SSL *s)
    void SSL_set_accept_state(SSL *s)
    void SSL_set_connect_state(SSL *s)
    int SSL_is_server(const SSL *s)
    void SSL_set_bio(SSL *s, BIO *rbio, BIO *wbio)
    int SSL_do_handshake(SSL *s)
    int SSL_is_init_finished(const SSL *s)
    int SSL_read(SSL *s, void *buf, int num)
    int SSL_write(SSL *s, const void *buf, int num)
    int SSL_shutdown(SSL *s)
    int SSL_get_shutdown(const SSL *s)
    int SSL_get_error(const SSL *s, int ret)
    int SSL_has_pending(const SSL *s)
    long SSL_set_mode(SSL *s, long mode)                   # a macro
    void SSL_set_read_ahead(SSL *s, int yes)
    int SSL_get_verify_mode(const SSL *s)
    long SSL_get_verify_result(const SSL *s)
    int SSL_set_tlsext_host_name(SSL *s, const char *name)  # a macro
    X509_VERIFY_PARAM *SSL_get0_param(SSL *s)
    const char *SSL_get_version(const SSL *s)
    const SSL_CIPHER *SSL_get_current_cipher(const SSL *s)
    const char *SSL_CIPHER_get_name(const SSL_CIPHER *c)
    const char *SSL_CIPHER_get_version(const SSL_CIPHER *c)
    int SSL_CIPHER_get_bits(const SSL_CIPHER *c, int *alg_bits)
    void SSL_get0_alpn_selected(const SSL *s, const unsigned char **data, unsigned int *len)
    int SSL_set_alpn_protos(SSL *s, const unsigned char *protos, unsigned int len)

    int X509_VERIFY_PARAM_set1_host(X509_VERIFY_PARAM *p, const char *name, size_t namelen)
    int X509_VERIFY_PARAM_set1_ip_asc(X509_VERIFY_PARAM *p, const char *ipasc)
    void X509_VERIFY_PARAM_set_hostflags(X509_VERIFY_PARAM *p, unsigned int flags)
    unsigned int X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS, X509_CHECK_FLAG_NEVER_CHECK_SUBJECT
    const char *X509_verify_cert_error_string(long n)
    int X509_V_OK
    int i2d_X509(X509 *x, unsigned char **out)
    void X509_free(X509 *x)

cdef extern from "<openssl/bio.h>" nogil:
    int BIO_TYPE_SOURCE_SINK
    int BIO_CTRL_FLUSH, BIO_CTRL_PUSH, BIO_CTRL_POP
    int BIO_get_new_index()
    BIO_METHOD *BIO_meth_new(int type, const char *name)
    int BIO_meth_set_write(BIO_METHOD *m, int (*write)(BIO *, const char *, int) noexcept nogil)
    int BIO_meth_set_read(BIO_METHOD *m, int (*read)(BIO *, char *, int) noexcept nogil)
    int BIO_meth_set_ctrl(BIO_METHOD *m, long (*ctrl)(BIO *, int, long, void *) noexcept nogil)
    int BIO_meth_set_create(BIO_METHOD *m, int (*create)(BIO *) noexcept nogil)
    BIO *BIO_new(const BIO_METHOD *m)
    int BIO_free(BIO *b)
    void BIO_set_data(BIO *b, void *ptr)
    void *BIO_get_data(BIO *b)
    void BIO_set_init(BIO *b, int init)
    void BIO_set_retry_read(BIO *b)                 # macros
    void BIO_set_retry_write(BIO *b)
    void BIO_clear_retry_flags(BIO *b)

cdef extern from "<openssl/err.h>" nogil:
    unsigned long ERR_get_error()
    unsigned long ERR_peek_error()
    unsigned long ERR_peek_last_error()
    void ERR_clear_error()
    void ERR_error_string_n(unsigned long e, char *buf, size_t len)
    const char *ERR_reason_error_string(unsigned long e)

cdef extern from "<openssl/crypto.h>" nogil:
    unsigned long OpenSSL_version_num()
    void OPENSSL_free(void *p)                      # a macro

cdef extern from *:
    """
    #include <openssl/ssl.h>
    /* Options that are newer than some supported OpenSSL releases: 0 where
       absent, so that setting them is a no-op there. */
    #ifndef SSL_OP_NO_RENEGOTIATION
    #define SSL_OP_NO_RENEGOTIATION 0
    #endif
    #ifndef SSL_OP_IGNORE_UNEXPECTED_EOF
    #define SSL_OP_IGNORE_UNEXPECTED_EOF 0
    #endif
    #if OPENSSL_VERSION_NUMBER >= 0x30000000L
    #define np_SSL_get1_peer_certificate(s) SSL_get1_peer_certificate(s)
    #else
    #define np_SSL_get1_peer_certificate(s) SSL_get_peer_certificate(s)
    #endif
    #define np_SSL_set_options(s, o) ((uint64_t)SSL_set_options((s), (o)))
    #define np_SSL_CTX_get_options(c) ((uint64_t)SSL_CTX_get_options(c))
    """
    uint64_t SSL_OP_NO_RENEGOTIATION, SSL_OP_IGNORE_UNEXPECTED_EOF
    X509 *np_SSL_get1_peer_certificate(const SSL *s) nogil
    uint64_t np_SSL_set_options(SSL *s, uint64_t op) nogil
    uint64_t np_SSL_CTX_get_options(const SSL_CTX *c) nogil
