/* forksmtp.smtp._lftext: the DATA reader's per-octet passes over a block of message
 * text, in C.
 *
 * The reader (buffer.py) turns each block of CRLF text into stored LF text, proves that
 * it holds no bare CR or LF, and checks the 1000-octet line limit.  With bytes methods
 * that is five C-level scans and two copies per block, each a memchr per line (about
 * 0.7 ms per MiB of 76-octet lines); lf_text does it in one comparison pass that the
 * compiler vectorises and one memchr and one memcpy per line.  find_dots looks for the
 * end of the data and for stuffed lines, where CPython's search for a several-octet
 * needle steps a few octets at a time.  buffer.py keeps the same computations in
 * Python, which the pure build runs and the tests compare these with.
 *
 * Only the block's own bounds are trusted: every index is checked against the length
 * CPython gives, the result is allocated at the block's length and shrunk once, and the
 * function holds the GIL throughout (it never calls back into Python).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* Is there a CR not followed by LF, or an LF not preceded by CR?  Branch-free over pairs
 * of neighbours so that the compiler vectorises it; a block that ends in CR has a bare
 * one (the reader never hands over the first half of a CRLF). */
static int
has_bare_newline(const unsigned char *s, Py_ssize_t n)
{
    unsigned int bad;
    Py_ssize_t i;

    if (n == 0)
        return 0;
    bad = (s[0] == '\n') | (s[n - 1] == '\r');
    for (i = 0; i + 1 < n; i++)
        bad |= (unsigned int)(s[i] == '\r') ^ (unsigned int)(s[i + 1] == '\n');
    return bad != 0;
}

/* The arguments every function here takes: a bytes block, then `count` integers that
 * must be >= 0 (into `ints`).  0, or -1 with the exception set. */
static int
parse_args(const char *name, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t count,
           const unsigned char **s, Py_ssize_t *n, Py_ssize_t *ints)
{
    Py_ssize_t k;

    if (nargs != count + 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd arguments", name, count + 1);
        return -1;
    }
    if (!PyBytes_CheckExact(args[0])) {
        PyErr_Format(PyExc_TypeError, "%s() block must be bytes", name);
        return -1;
    }
    for (k = 0; k < count; k++) {
        ints[k] = PyLong_AsSsize_t(args[k + 1]);
        if (ints[k] == -1 && PyErr_Occurred())
            return -1;
        if (ints[k] < 0) {
            PyErr_Format(PyExc_ValueError, "%s() arguments must be >= 0", name);
            return -1;
        }
    }
    *s = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    *n = PyBytes_GET_SIZE(args[0]);
    return 0;
}

PyDoc_STRVAR(lf_text_doc,
"lf_text(block, carry, limit) -> (text or None, long)\n\n"
"block with each CRLF turned into LF, or None when it holds a bare CR or LF;\n"
"long says whether a line, once unstuffed, is longer than limit octets without\n"
"its line ending.  carry octets of block's first line came before it (0: block\n"
"starts a line, whose leading dot is a transparency dot).  The last line may be\n"
"unfinished; it counts as long once it is.");

static PyObject *
lf_text(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *s, *cr;
    Py_ssize_t n, ints[2], carry, limit, start, end, len, count, room;
    PyObject *text;
    char *out, *base;
    int first = 1, is_long = 0;

    (void)module;
    if (parse_args("lf_text", args, nargs, 2, &s, &n, ints) < 0)
        return NULL;
    carry = ints[0];
    limit = ints[1];
    if (has_bare_newline(s, n))
        return Py_BuildValue("(OO)", Py_None, Py_False);

    text = PyBytes_FromStringAndSize(NULL, n);
    if (text == NULL)
        return NULL;
    base = out = PyBytes_AS_STRING(text);
    /* A carried line is long already once its carry is, even with no octet here. */
    if (carry > limit)
        is_long = 1;
    /* Every CR now starts a CRLF: copy the runs between them, LF for each CRLF. */
    for (start = 0; start < n; start = end + 2) {
        cr = memchr(s + start, '\r', (size_t)(n - start));
        end = cr != NULL ? (Py_ssize_t)(cr - s) : n;
        len = end - start;
        memcpy(out, s + start, (size_t)len);
        out += len;
        /* Compared with what the limit leaves, never added to the carry: no overflow
         * whatever the arguments. */
        count = len;
        room = limit;
        if (first && carry > 0)
            room = carry <= limit ? limit - carry : -1;
        else if (s[start] == '.')  /* start < n: inside the block */
            count--;  /* the transparency dot the reader removes */
        if (count > room)
            is_long = 1;
        first = 0;
        if (cr == NULL)
            break;
        *out++ = '\n';
    }
    if (_PyBytes_Resize(&text, out - base) < 0)
        return NULL;
    return Py_BuildValue("(NO)", text, is_long ? Py_True : Py_False);
}

/* The searches below test every position of a chunk without a branch (which the
 * compiler vectorises: about 0.13 ms per MiB whatever the text, where CPython's search
 * for a three- or five-octet needle takes 0.6 to 3.2) and look for the exact position
 * only in a chunk that has one. */
#define SCAN_CHUNK 256

/* 1 if CRLF. (width 3) or CRLF.CRLF (width 5) starts at s + i, else 0; without a
 * branch, so that the chunk loop below vectorises. */
static inline unsigned int
marker_at(const unsigned char *s, Py_ssize_t i, int width)
{
    unsigned int m = (unsigned int)(s[i] == '\r') & (unsigned int)(s[i + 1] == '\n')
                     & (unsigned int)(s[i + 2] == '.');
    if (width == 5)
        m &= (unsigned int)(s[i + 3] == '\r') & (unsigned int)(s[i + 4] == '\n');
    return m;
}

/* The first i >= start where the marker of `width` octets starts, or -1.  Inlined with
 * a constant width, once per marker. */
static inline Py_ssize_t
find_marker(const unsigned char *s, Py_ssize_t n, Py_ssize_t start, int width)
{
    Py_ssize_t base, stop, i, last = n - width;  /* the last i where the marker fits */
    unsigned int hit;

    for (base = start; base <= last; base = stop) {
        stop = last - base >= SCAN_CHUNK ? base + SCAN_CHUNK : last + 1;
        hit = 0;
        for (i = base; i < stop; i++)
            hit |= marker_at(s, i, width);
        if (hit)
            for (i = base; i < stop; i++)
                if (marker_at(s, i, width))
                    return i;
    }
    return -1;
}

PyDoc_STRVAR(find_dots_doc,
"find_dots(block, start) -> (dot, end)\n\n"
"dot: the index of the first CRLF. in block at start or later; end: the index of\n"
"the first CRLF.CRLF at start or later, equal to dot when that one is it; -1 for\n"
"either when there is none.");

static PyObject *
find_dots(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *s;
    Py_ssize_t n, start, dot, end;

    (void)module;
    if (parse_args("find_dots", args, nargs, 1, &s, &n, &start) < 0)
        return NULL;
    dot = find_marker(s, n, start, 3);
    if (dot < 0)
        end = -1;
    else if (dot + 4 < n && s[dot + 3] == '\r' && s[dot + 4] == '\n')
        end = dot;
    else  /* a CRLF.CRLF cannot start inside this CRLF. */
        end = find_marker(s, n, dot + 3, 5);
    return Py_BuildValue("(nn)", dot, end);
}

static PyMethodDef lftext_methods[] = {
    {"lf_text", (PyCFunction)(void (*)(void))lf_text, METH_FASTCALL, lf_text_doc},
    {"find_dots", (PyCFunction)(void (*)(void))find_dots, METH_FASTCALL, find_dots_doc},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef lftext_module = {
    PyModuleDef_HEAD_INIT, "forksmtp.smtp._lftext",
    "The DATA reader's per-octet passes in C (see buffer.py).", -1, lftext_methods,
    NULL, NULL, NULL, NULL
};

PyMODINIT_FUNC
PyInit__lftext(void)
{
    return PyModule_Create(&lftext_module);
}
