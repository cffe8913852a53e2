;; stderr.wat — writes 1 MiB to stderr, then prints a valid response.
;;
;; Why: stderr goes to the tenant's log, bounded, and never into the
;; response: the client sees only the stdout body, the log gets at most its
;; cap, and the guest is not stopped for writing too much there. Write errors
;; on stderr are ignored.
;;
;; Output:  stderr: 1 MiB of "e" (16 writes of 64 KiB)
;;          stdout: content-type: text/plain, blank line, "wrote 1 MiB to stderr\n"
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the output;
;;          65536..131071 the buffer of "e".
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 2)

  (global $BUF i32 (i32.const 65536))
  (global $BUF_LEN i32 (i32.const 65536))
  (global $WRITES i32 (i32.const 16))

  (data (i32.const 16) "content-type: text/plain\n\nwrote 1 MiB to stderr\n")  ;; 48 bytes

  ;; Write [ptr, ptr+len) to fd, retrying short writes; stops on an error or a
  ;; write that makes no progress.
  (func $write_all (param $fd i32) (param $ptr i32) (param $len i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (br_if $done (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $done (i32.eqz (i32.load (i32.const 8))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
        (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
        (br $more))))

  (func (export "_start")
    (local $left i32)
    (memory.fill (global.get $BUF) (i32.const 0x65) (global.get $BUF_LEN))
    (local.set $left (global.get $WRITES))
    (loop $next
      (call $write_all (i32.const 2) (global.get $BUF) (global.get $BUF_LEN))
      (local.set $left (i32.sub (local.get $left) (i32.const 1)))
      (br_if $next (local.get $left)))
    (call $write_all (i32.const 1) (i32.const 16) (i32.const 48))))
