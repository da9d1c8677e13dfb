#!/bin/sh
# erlc for an Erlang runtime that has the compiler application but no erlc front end, such
# as ejabberd's own release in ProcessOne's container image (Containerfile.official puts it
# on the PATH as erlc for `pymod-push build-module`). It takes what build-module passes:
#
#   erlc.sh -o DIR [+TERM] [-DNAME[=VALUE]] [-enable-feature F] [-I DIR] [-pa DIR] FILE.erl...
#
# and compiles each file with compile:file/2, as erlc would (errors and warnings reported,
# exit status 1 when one file fails). ERL: the erl to run (default: erl on the PATH).
set -eu
exec "${ERL:-erl}" -noshell -eval '
Term = fun(Text) ->
           {ok, Tokens, _} = erl_scan:string(Text ++ "."),
           {ok, Value} = erl_parse:parse_term(Tokens),
           Value
       end,
Parse = fun P(["-o", Dir | T], Opts, Files) -> P(T, [{outdir, Dir} | Opts], Files);
            P(["-I", Dir | T], Opts, Files) -> P(T, [{i, Dir} | Opts], Files);
            P(["-pa", Dir | T], Opts, Files) -> code:add_patha(Dir), P(T, Opts, Files);
            P(["-enable-feature", F | T], Opts, Files) ->
                P(T, [{feature, list_to_atom(F), enable} | Opts], Files);
            P(["-D" ++ Define | T], Opts, Files) ->
                Opt = case string:split(Define, "=") of
                          [Name] -> {d, list_to_atom(Name)};
                          [Name, Value] -> {d, list_to_atom(Name), Term(Value)}
                      end,
                P(T, [Opt | Opts], Files);
            P(["+" ++ Option | T], Opts, Files) -> P(T, [Term(Option) | Opts], Files);
            P(["-" ++ _ = Unknown | _], _, _) ->
                io:format(standard_error, "erlc.sh: unsupported option ~s~n", [Unknown]),
                halt(2);
            P([File | T], Opts, Files) -> P(T, Opts, [File | Files]);
            P([], Opts, Files) -> {lists:reverse(Opts), lists:reverse(Files)}
        end,
{Options, Files} = Parse(init:get_plain_arguments(), [], []),
Failed = [File || File <- Files,
                  element(1, compile:file(File, [report_errors, report_warnings | Options]))
                      =/= ok],
halt(case Failed of [] -> 0; _ -> 1 end).
' -extra "$@"
