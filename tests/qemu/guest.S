/*
 * A 512-byte x86 boot-sector guest for the QEMU migration test and bench. No downloaded images: the test
 * assembles it with binutils (as --32, ld -Ttext 0x7c00 --oformat binary) and SeaBIOS boots it from a raw disk.
 *
 * What it does:
 *  1. Fills guest RAM between 2 MiB and (top of RAM - 2 MiB) so a migration has something to move. The size of
 *     RAM comes from CMOS (64 KiB blocks above 16 MiB, registers 0x34/0x35). Page p gets, by p mod 4:
 *       0: nothing (stays zero)      1, 2: xorshift32 pseudo-random bytes (incompressible)
 *       3: a 64-byte pattern repeated (highly compressible; differs from page to page)
 *     RAM is reached from real mode through "unreal mode" (FS with a 4 GiB limit), interrupts off meanwhile.
 *  2. Forever: sleeps on HLT until the BIOS timer tick (IRQ 0, 18.2 Hz) advances by 2 (about 9 lines a second),
 *     increments a counter kept in RAM at 0x500 and prints "n=<decimal>\n" on COM1 (0x3f8).
 *
 * A migrated guest therefore carries on counting where the source stopped; a guest that restarted from scratch
 * would print n=1 again. The test checks exactly that on the serial logs of both sides.
 */
        .code16
        .section .text
        .globl _start
_start:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x7c00, %sp
        cld

        /* Fast A20 gate (port 0x92), so addresses above 1 MiB are not wrapped. */
        in      $0x92, %al
        or      $2, %al
        and     $0xfe, %al
        out     %al, $0x92

        /* Unreal mode: enter protected mode, load FS with a flat 4 GiB data descriptor, come back. FS keeps its
           cached 4 GiB limit in real mode until it is reloaded by someone else. */
        lgdt    gdt_desc
        mov     %cr0, %eax
        or      $1, %al
        mov     %eax, %cr0
        jmp     1f
1:      mov     $8, %bx
        mov     %bx, %fs
        and     $0xfe, %al
        mov     %eax, %cr0
        jmp     2f
2:      xor     %ax, %ax
        mov     %ax, %fs

        /* Top of RAM below 4 GiB: 16 MiB + CMOS[0x35:0x34] * 64 KiB (zero when RAM <= 16 MiB: no fill then). */
        mov     $0x35, %al
        out     %al, $0x70
        in      $0x71, %al
        mov     %al, %ah
        mov     $0x34, %al
        out     %al, $0x70
        in      $0x71, %al
        movzwl  %ax, %ebp
        test    %ebp, %ebp
        jz      fill_done
        shl     $16, %ebp
        add     $(16 << 20) - (2 << 20), %ebp   /* end = top - 2 MiB (SeaBIOS keeps tables at the top) */

        mov     $0x200000, %edi                 /* start at 2 MiB */
        mov     $0x2545f491, %edx               /* xorshift32 state */
fill_page:
        cmp     %ebp, %edi
        jae     fill_done
        mov     %edi, %ebx
        shr     $12, %ebx                       /* page number */
        mov     %bl, %al
        and     $3, %al
        jz      zero_page
        cmp     $3, %al
        je      pattern_page
        mov     $1024, %cx
random_dword:
        mov     %edx, %eax
        shl     $13, %eax
        xor     %eax, %edx
        mov     %edx, %eax
        shr     $17, %eax
        xor     %eax, %edx
        mov     %edx, %eax
        shl     $5, %eax
        xor     %eax, %edx
        mov     %edx, %fs:(%edi)
        add     $4, %edi
        dec     %cx
        jnz     random_dword
        jmp     fill_page
pattern_page:
        mov     $1024, %cx
pattern_dword:
        mov     %edi, %eax
        and     $0x3c, %eax                     /* position in the 64-byte period */
        imul    $0x01010101, %eax, %eax
        xor     %ebx, %eax                      /* differs per page */
        mov     %eax, %fs:(%edi)
        add     $4, %edi
        dec     %cx
        jnz     pattern_dword
        jmp     fill_page
zero_page:
        add     $4096, %edi
        jmp     fill_page
fill_done:

        movl    $0, 0x500                       /* the counter */
        mov     0x46c, %esi                     /* BIOS tick count at 0040:006c */
        sti

main_loop:
        hlt                                     /* sleep until an interrupt */
        mov     0x46c, %eax
        sub     %esi, %eax
        cmp     $2, %eax
        jb      main_loop
        mov     0x46c, %esi

        incl    0x500
        mov     $'n', %al
        call    putc
        mov     $'=', %al
        call    putc
        /* decimal digits, least significant first, pushed on the stack */
        mov     0x500, %eax
        mov     $10, %ebx
        xor     %cx, %cx
3:      xor     %edx, %edx
        div     %ebx
        push    %dx
        inc     %cx
        test    %eax, %eax
        jnz     3b
4:      pop     %ax
        add     $'0', %al
        call    putc
        dec     %cx
        jnz     4b
        mov     $'\n', %al
        call    putc
        jmp     main_loop

/* putc: AL to COM1 once the transmit holding register is empty. Keeps CX. */
putc:
        mov     %al, %ah
        mov     $0x3fd, %dx
5:      in      %dx, %al
        test    $0x20, %al
        jz      5b
        mov     $0x3f8, %dx
        mov     %ah, %al
        out     %al, %dx
        ret

        .p2align 3
gdt:
        .quad   0                               /* null descriptor */
        .quad   0x00cf92000000ffff              /* 8: data, base 0, limit 4 GiB, 32-bit, writable */
gdt_desc:
        .word   gdt_desc - gdt - 1
        .long   gdt

        .org    510
        .word   0xaa55
