;; escape_probes.wat — tries each WASI escape from the sandbox in one run, and reports.
;;
;; Why: tests/hostile/test_wasi_escapes.py keeps the hostile review's escape probes as a
;; regression test. The guest answers a CGI response (text/plain), one line per probe:
;;   "<probe>: errno N"          the call failed with WASI errno N
;;   "<probe>: opened <bytes>"   path_open succeeded; the first bytes of the file follow
;;   "<probe>: ok"               a non-open call succeeded
;;   "preopen N <name>"          fd N is a preopened directory named <name> (fds 0..63)
;; The volume /static is assumed to be fd 3 (the "preopen" lines say whether it is).
;;
;; Memory: 0..7 iovec; 8..15 results; 16..23 prestat; 32..47 digits;
;;         64..1023 constant text; 1024..1279 preopen name; 4096..4159 read buffer.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close"
    (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get"
    (func $fd_prestat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_dir_name"
    (func $fd_prestat_dir_name (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sock_accept"
    (func $sock_accept (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sock_recv"
    (func $sock_recv (param i32 i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 1)

  (global $IOV i32 (i32.const 0))
  (global $RESULT i32 (i32.const 8))
  (global $RESULT2 i32 (i32.const 12))
  (global $PRESTAT i32 (i32.const 16))
  (global $DIGITS i32 (i32.const 32))
  (global $NAME i32 (i32.const 1024))
  (global $BUF i32 (i32.const 4096))
  (global $BUF_LEN i32 (i32.const 64))
  (global $VOLUME i32 (i32.const 3))
  (global $FOLLOW i32 (i32.const 1))        ;; lookupflags: symlink_follow
  (global $CREAT i32 (i32.const 1))         ;; oflags: creat
  (global $READ i64 (i64.const 2))          ;; rights: fd_read
  (global $WRITE i64 (i64.const 64))        ;; rights: fd_write

  (data (i32.const 64) "content-type: text/plain\n\n")   ;; 26
  (data (i32.const 96) ": errno ")                       ;; 8
  (data (i32.const 112) ": opened ")                     ;; 9
  (data (i32.const 128) ": ok\n")                        ;; 5
  (data (i32.const 136) "\n")                            ;; 1
  (data (i32.const 144) "preopen ")                      ;; 8
  (data (i32.const 160) " ")                             ;; 1
  ;; probe names
  (data (i32.const 200) "traversal")                     ;; 9
  (data (i32.const 216) "symlink-dir")                   ;; 11
  (data (i32.const 232) "symlink-abs")                   ;; 11
  (data (i32.const 248) "write-existing")                ;; 14
  (data (i32.const 264) "create")                        ;; 6
  (data (i32.const 272) "sock-accept-volume")            ;; 18
  (data (i32.const 296) "sock-accept-bogus")             ;; 17
  (data (i32.const 320) "sock-recv-volume")              ;; 16
  (data (i32.const 344) "sock-recv-bogus")               ;; 15
  (data (i32.const 360) "write-stdin")                   ;; 11
  (data (i32.const 376) "read-stdout")                   ;; 11
  (data (i32.const 392) "legit")                         ;; 5
  (data (i32.const 400) "write-volume-fd")               ;; 15
  (data (i32.const 416) "traversal-deep")                ;; 14
  ;; paths
  (data (i32.const 512) "../secret.txt")                 ;; 13
  (data (i32.const 528) "link/secret.txt")               ;; 15
  (data (i32.const 544) "abs")                           ;; 3
  (data (i32.const 552) "hello.txt")                     ;; 9
  (data (i32.const 568) "new.txt")                       ;; 7
  (data (i32.const 576) "hello.txt/../../secret.txt")    ;; 26
  ;; what the stdio probes try to move
  (data (i32.const 640) "stdin!")                        ;; 6

  (func $print (param $ptr i32) (param $len i32)
    (i32.store (global.get $IOV) (local.get $ptr))
    (i32.store offset=4 (global.get $IOV) (local.get $len))
    (drop (call $fd_write (i32.const 1) (global.get $IOV) (i32.const 1) (global.get $RESULT2))))

  ;; Print n (unsigned) in decimal.
  (func $number (param $n i32)
    (local $p i32)
    (local.set $p (i32.add (global.get $DIGITS) (i32.const 12)))
    (loop $next
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $next (local.get $n)))
    (call $print (local.get $p)
      (i32.sub (i32.add (global.get $DIGITS) (i32.const 12)) (local.get $p))))

  ;; "<label>: errno N\n", or "<label>: ok\n" when errno is 0.
  (func $report (param $label i32) (param $label_len i32) (param $errno i32)
    (call $print (local.get $label) (local.get $label_len))
    (if (i32.eqz (local.get $errno))
      (then (call $print (i32.const 128) (i32.const 5)) (return)))
    (call $print (i32.const 96) (i32.const 8))
    (call $number (local.get $errno))
    (call $print (i32.const 136) (i32.const 1)))

  ;; path_open under the volume; on success print "opened" and the file's first bytes
  ;; (newlines and all: the test looks for a secret anywhere in the body).
  (func $probe_open (param $label i32) (param $label_len i32) (param $dirflags i32)
                    (param $path i32) (param $path_len i32) (param $oflags i32)
                    (param $rights i64)
    (local $errno i32) (local $fd i32) (local $n i32)
    (local.set $errno
      (call $path_open (global.get $VOLUME) (local.get $dirflags) (local.get $path)
                       (local.get $path_len) (local.get $oflags) (local.get $rights)
                       (i64.const 0) (i32.const 0) (global.get $RESULT)))
    (if (local.get $errno)
      (then (call $report (local.get $label) (local.get $label_len) (local.get $errno))
            (return)))
    (local.set $fd (i32.load (global.get $RESULT)))
    (i32.store (global.get $IOV) (global.get $BUF))
    (i32.store offset=4 (global.get $IOV) (global.get $BUF_LEN))
    (if (call $fd_read (local.get $fd) (global.get $IOV) (i32.const 1) (global.get $RESULT2))
      (then (local.set $n (i32.const 0)))
      (else (local.set $n (i32.load (global.get $RESULT2)))))
    (call $print (local.get $label) (local.get $label_len))
    (call $print (i32.const 112) (i32.const 9))
    (call $print (global.get $BUF) (local.get $n))
    (call $print (i32.const 136) (i32.const 1))
    (drop (call $fd_close (local.get $fd))))

  ;; "preopen N <name>" for each preopened directory among fds 0..63.
  (func $enumerate_preopens
    (local $fd i32) (local $len i32)
    (loop $next
      (if (i32.eqz (call $fd_prestat_get (local.get $fd) (global.get $PRESTAT)))
        (then
          (local.set $len (i32.load offset=4 (global.get $PRESTAT)))
          (if (i32.gt_u (local.get $len) (i32.const 255)) (then (local.set $len (i32.const 255))))
          (drop (call $fd_prestat_dir_name (local.get $fd) (global.get $NAME) (local.get $len)))
          (call $print (i32.const 144) (i32.const 8))
          (call $number (local.get $fd))
          (call $print (i32.const 160) (i32.const 1))
          (call $print (global.get $NAME) (local.get $len))
          (call $print (i32.const 136) (i32.const 1))))
      (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
      (br_if $next (i32.lt_u (local.get $fd) (i32.const 64)))))

  ;; One iovec at $IOV over [ptr, ptr+len).
  (func $iovec (param $ptr i32) (param $len i32)
    (i32.store (global.get $IOV) (local.get $ptr))
    (i32.store offset=4 (global.get $IOV) (local.get $len)))

  (func (export "_start")
    (call $print (i32.const 64) (i32.const 26))
    (call $enumerate_preopens)

    ;; The file system: out of the volume by "..", by links, and by writing.
    (call $probe_open (i32.const 200) (i32.const 9) (i32.const 0)
                      (i32.const 512) (i32.const 13) (i32.const 0) (global.get $READ))
    (call $probe_open (i32.const 416) (i32.const 14) (global.get $FOLLOW)
                      (i32.const 576) (i32.const 26) (i32.const 0) (global.get $READ))
    (call $probe_open (i32.const 216) (i32.const 11) (global.get $FOLLOW)
                      (i32.const 528) (i32.const 15) (i32.const 0) (global.get $READ))
    (call $probe_open (i32.const 232) (i32.const 11) (global.get $FOLLOW)
                      (i32.const 544) (i32.const 3) (i32.const 0) (global.get $READ))
    (call $probe_open (i32.const 248) (i32.const 14) (i32.const 0)
                      (i32.const 552) (i32.const 9) (i32.const 0) (global.get $WRITE))
    (call $probe_open (i32.const 264) (i32.const 6) (i32.const 0)
                      (i32.const 568) (i32.const 7) (global.get $CREAT)
                      (i64.or (global.get $READ) (global.get $WRITE)))

    ;; Sockets: none is granted; the volume's fd and a made-up fd are not sockets.
    (call $report (i32.const 272) (i32.const 18)
      (call $sock_accept (global.get $VOLUME) (i32.const 0) (global.get $RESULT)))
    (call $report (i32.const 296) (i32.const 17)
      (call $sock_accept (i32.const 1000) (i32.const 0) (global.get $RESULT)))
    (call $iovec (global.get $BUF) (global.get $BUF_LEN))
    (call $report (i32.const 320) (i32.const 16)
      (call $sock_recv (global.get $VOLUME) (global.get $IOV) (i32.const 1) (i32.const 0)
                       (global.get $RESULT) (global.get $RESULT2)))
    (call $iovec (global.get $BUF) (global.get $BUF_LEN))
    (call $report (i32.const 344) (i32.const 15)
      (call $sock_recv (i32.const 1000) (global.get $IOV) (i32.const 1) (i32.const 0)
                       (global.get $RESULT) (global.get $RESULT2)))

    ;; Stdio the wrong way round, and a write to the volume's directory fd.
    (call $iovec (i32.const 640) (i32.const 6))
    (call $report (i32.const 360) (i32.const 11)
      (call $fd_write (i32.const 0) (global.get $IOV) (i32.const 1) (global.get $RESULT)))
    (call $iovec (global.get $BUF) (global.get $BUF_LEN))
    (call $report (i32.const 376) (i32.const 11)
      (call $fd_read (i32.const 1) (global.get $IOV) (i32.const 1) (global.get $RESULT)))
    (call $iovec (i32.const 640) (i32.const 6))
    (call $report (i32.const 400) (i32.const 15)
      (call $fd_write (global.get $VOLUME) (global.get $IOV) (i32.const 1) (global.get $RESULT)))

    ;; The control: a file inside the volume opens and reads.
    (call $probe_open (i32.const 392) (i32.const 5) (i32.const 0)
                      (i32.const 552) (i32.const 9) (i32.const 0) (global.get $READ))))
