/* Optional C accelerator: wschat's hot loops.  Each function gives the same
 * result as the Python it stands in for (see wschat/accelerator.py).
 *
 * apply_mask(data, mask) -> bytes
 *     XOR a bytes-like object with a 4-byte mask repeated, eight bytes at a
 *     time (wschat.frames.apply_mask_python).
 *
 * frame_texts(payloads, below=0) -> bytes or None
 *     A list of UTF-8 payloads as final text frames, unmasked, joined; None
 *     when a payload has ``below`` bytes or more (below > 0)
 *     (wschat.frames.frame_texts_python).
 *
 * json_texts(lines, fallback) -> list
 *     Each chat message's text from its JSON line, without decoding the
 *     JSON where no escape is in the text; fallback(line) for the others
 *     (wschat.dialect.text_of, line by line).
 *
 * message_lines(batch) -> (first, lines) or None
 *     A published batch split at each "\nM" in one pass, or None when a
 *     "\nE" is in it (wschat.redis_store.message_lines_python).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *
apply_mask(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data, mask;
    PyObject *result = NULL;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "apply_mask(data, mask) takes 2 arguments");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &mask, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (mask.len != 4) {
        PyErr_SetString(PyExc_ValueError, "mask must be 4 bytes long");
        goto done;
    }

    result = PyBytes_FromStringAndSize(NULL, data.len);
    if (result == NULL)
        goto done;

    {
        const unsigned char *src = (const unsigned char *)data.buf;
        const unsigned char *key = (const unsigned char *)mask.buf;
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(result);
        Py_ssize_t size = data.len, i = 0;
        uint64_t key64;
        unsigned char pattern[8];

        for (int k = 0; k < 8; k++)
            pattern[k] = key[k & 3];
        memcpy(&key64, pattern, 8);

        for (; i + 8 <= size; i += 8) {
            uint64_t chunk;
            memcpy(&chunk, src + i, 8);
            chunk ^= key64;
            memcpy(dst + i, &chunk, 8);
        }
        for (; i < size; i++)
            dst[i] = src[i] ^ key[i & 3];
    }

done:
    PyBuffer_Release(&mask);
    PyBuffer_Release(&data);
    return result;
}

static Py_ssize_t
text_header_size(Py_ssize_t size)
{
    return size < 126 ? 2 : size < 65536 ? 4 : 10;
}

static PyObject *
frame_texts(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t count, total = 0, below = 0;
    PyObject *payloads, *result;
    unsigned char *out;

    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "frame_texts(payloads, below=0) takes 1 or 2 arguments");
        return NULL;
    }
    if (nargs == 2 && (below = PyLong_AsSsize_t(args[1])) == -1 && PyErr_Occurred())
        return NULL;
    payloads = args[0];
    if (!PyList_Check(payloads)) {
        PyErr_SetString(PyExc_TypeError, "frame_texts() takes a list of bytes");
        return NULL;
    }
    count = PyList_GET_SIZE(payloads);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *payload = PyList_GET_ITEM(payloads, i);
        if (!PyBytes_Check(payload)) {
            PyErr_SetString(PyExc_TypeError, "frame_texts() takes a list of bytes");
            return NULL;
        }
        if (below > 0 && PyBytes_GET_SIZE(payload) >= below)
            Py_RETURN_NONE;
        total += text_header_size(PyBytes_GET_SIZE(payload)) + PyBytes_GET_SIZE(payload);
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL)
        return NULL;
    out = (unsigned char *)PyBytes_AS_STRING(result);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *payload = PyList_GET_ITEM(payloads, i);
        Py_ssize_t size = PyBytes_GET_SIZE(payload);
        uint64_t length = (uint64_t)size;
        *out++ = 0x81;  /* FIN, text */
        if (size < 126) {
            *out++ = (unsigned char)size;
        } else if (size < 65536) {
            *out++ = 126;
            *out++ = (unsigned char)(length >> 8);
            *out++ = (unsigned char)length;
        } else {
            *out++ = 127;
            for (int shift = 56; shift >= 0; shift -= 8)
                *out++ = (unsigned char)(length >> shift);
        }
        memcpy(out, PyBytes_AS_STRING(payload), size);
        out += size;
    }
    return result;
}

/* Where the text of one JSON line starts and ends: 0 when it must be decoded. */
static int
plain_text(const char *line, Py_ssize_t size, Py_ssize_t *start, Py_ssize_t *end)
{
    static const char key[] = ",\"text\":\"";
    const Py_ssize_t key_size = sizeof(key) - 1;
    const char *found = NULL, *scan = line, *stop = line + size, *quote;

    while (stop - scan >= key_size) {
        const char *comma = memchr(scan, ',', stop - scan - key_size + 1);
        if (comma == NULL)
            break;
        if (memcmp(comma, key, key_size) == 0) {
            found = comma;
            break;
        }
        scan = comma + 1;
    }
    if (found == NULL)
        return 0;
    *start = found + key_size - line;
    quote = memchr(line + *start, '"', size - *start);
    if (quote == NULL || memchr(line + *start, '\\', quote - (line + *start)) != NULL)
        return 0;
    *end = quote - line;
    return 1;
}

static PyObject *
json_texts(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *lines, *fallback, *result;
    Py_ssize_t count;

    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "json_texts(lines, fallback) takes a list of bytes and a callable");
        return NULL;
    }
    lines = args[0];
    fallback = args[1];
    count = PyList_GET_SIZE(lines);
    result = PyList_New(count);
    if (result == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *line = PyList_GET_ITEM(lines, i), *text;
        Py_ssize_t start, end;
        if (!PyBytes_Check(line)) {
            PyErr_SetString(PyExc_TypeError, "json_texts() takes a list of bytes");
            Py_DECREF(result);
            return NULL;
        }
        if (plain_text(PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line), &start, &end))
            text = PyBytes_FromStringAndSize(PyBytes_AS_STRING(line) + start, end - start);
        else
            text = PyObject_CallOneArg(fallback, line);
        if (text == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyList_SET_ITEM(result, i, text);
    }
    return result;
}

/* A batch's bytes from start to stop: its first line, then each message's. */
static int
add_part(PyObject **first, PyObject *lines, const char *start, const char *stop)
{
    PyObject *part = PyBytes_FromStringAndSize(start, stop - start);
    int status;

    if (part == NULL)
        return -1;
    if (*first == NULL) {
        *first = part;
        return 0;
    }
    status = PyList_Append(lines, part);
    Py_DECREF(part);
    return status;
}

static PyObject *
message_lines(PyObject *module, PyObject *batch)
{
    const char *start, *scan, *end, *newline;
    PyObject *lines, *first = NULL;

    if (!PyBytes_Check(batch)) {
        PyErr_SetString(PyExc_TypeError, "message_lines() takes bytes");
        return NULL;
    }
    start = scan = PyBytes_AS_STRING(batch);
    end = start + PyBytes_GET_SIZE(batch);
    lines = PyList_New(0);
    if (lines == NULL)
        return NULL;
    /* A newline that is the last byte is a line's content, as it is to split. */
    while ((newline = memchr(scan, '\n', end - scan)) != NULL && newline + 1 < end) {
        scan = newline + 1;
        if (*scan == 'E') {  /* an event: the caller reads the batch line by line */
            Py_XDECREF(first);
            Py_DECREF(lines);
            Py_RETURN_NONE;
        }
        if (*scan != 'M')
            continue;
        if (add_part(&first, lines, start, newline) < 0)
            goto error;
        start = ++scan;
    }
    if (add_part(&first, lines, start, end) < 0)
        goto error;
    return Py_BuildValue("(NN)", first, lines);

error:
    Py_XDECREF(first);
    Py_DECREF(lines);
    return NULL;
}

static PyMethodDef speedups_methods[] = {
    {"apply_mask", (PyCFunction)(void (*)(void))apply_mask, METH_FASTCALL,
     "apply_mask(data, mask) -> bytes: XOR data with the 4-byte mask repeated."},
    {"frame_texts", (PyCFunction)(void (*)(void))frame_texts, METH_FASTCALL,
     "frame_texts(payloads, below=0) -> bytes: UTF-8 payloads as final text frames, joined; "
     "None when one has below bytes or more."},
    {"json_texts", (PyCFunction)(void (*)(void))json_texts, METH_FASTCALL,
     "json_texts(lines, fallback) -> list: each JSON line's text, fallback(line) where it must be decoded."},
    {"message_lines", (PyCFunction)message_lines, METH_O,
     "message_lines(batch) -> (first, lines), or None where an event is in it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "wschat._speedups",
    "C accelerator for wschat's hot loops.", -1, speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&speedups_module);
}
