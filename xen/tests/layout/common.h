/*
 * Layout probes for xen/tests/layout.rs.
 *
 * EMIT(name, value) records one integer under a name. A native build runs the program and
 * prints "name value" lines. A build for another ABI (-m32) is only compiled to assembly
 * (-S, no libc needed): each value is embedded as "@@name value@@" in the assembly text,
 * the way Linux's asm-offsets works, and the test reads it from there.
 */
#ifndef DOMIO_LAYOUT_COMMON_H
#define DOMIO_LAYOUT_COMMON_H

#include <stddef.h>

#ifdef LAYOUT_ASM
#define EMIT(name, val) \
    __asm__ volatile("\n.ascii \"@@" name " %c0@@\"" : : "i"((long long)(val)))
#else
#include <stdio.h>
#define EMIT(name, val) printf("%s %lld\n", name, (long long)(val))
#endif

#define SZ(T) EMIT("sizeof " #T, sizeof(T))
#define OFF(T, f) EMIT("offsetof " #T " " #f, offsetof(T, f))
#define K(x) EMIT(#x, (x))

#endif
